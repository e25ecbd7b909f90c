//! The `surveil` command-line client (arrives with issue #6).

fn main() {
    eprintln!("surveil: the command-line client is not built yet (issue #6)");
    std::process::exit(1);
}
