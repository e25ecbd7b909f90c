//! The PostgreSQL test harness itself: a server starts as an unprivileged
//! user, takes a password over TCP, keeps its data across a crash-restart,
//! and is gone after drop.

use surveil_tests::postgres::{self, Postgres};

#[test]
fn a_server_starts_keeps_data_across_a_restart_and_stops_at_drop() {
    if let Err(why) = postgres::available() {
        postgres::skip_or_fail("postgres harness", &why);
        return;
    }
    let mut pg = Postgres::start().expect("start PostgreSQL");
    let db = pg.create_database().unwrap();
    pg.psql(&db, "CREATE TABLE t (n int); INSERT INTO t VALUES (42)")
        .unwrap();
    let port = pg.port();
    pg.restart().unwrap();
    assert_eq!(pg.port(), port, "a restart keeps the port");
    assert_eq!(pg.psql(&db, "SELECT n FROM t").unwrap(), "42");
    assert!(
        std::fs::read_to_string(pg.password_file())
            .unwrap()
            .contains(pg.password())
    );
    let addr = pg.addr();
    drop(pg);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the server stopped at drop"
    );
}
