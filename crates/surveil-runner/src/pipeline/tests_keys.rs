//! Parser tests of the keys beyond name/run/timeout/env/allow_failure/
//! network: each key's value and each of its errors, with the line.

use super::*;

fn ok(text: &str) -> Pipeline {
    parse(text.as_bytes(), PIPELINE_FILE).unwrap()
}

fn err(text: &str) -> String {
    parse(text.as_bytes(), PIPELINE_FILE)
        .unwrap_err()
        .to_string()
}

fn names(p: &Pipeline) -> Vec<&str> {
    p.tasks.iter().map(|t| t.name.as_str()).collect()
}

#[test]
fn without_needs_tasks_chain_in_file_order() {
    let p = ok(
        "[[task]]\nname = \"a\"\nrun = \"x\"\n[[task]]\nname = \"b\"\nrun = \"y\"\n[[task]]\nname = \"c\"\nrun = \"z\"\n",
    );
    let needs: Vec<&[usize]> = p.tasks.iter().map(|t| t.needs.as_slice()).collect();
    assert_eq!(needs, [&[][..], &[0], &[1]]);
    assert_eq!(p.parallelism, None);
    assert!(p.labels.is_empty());
    let t = &p.tasks[0];
    assert!(t.artifacts.is_empty() && t.reports.is_empty() && t.cache.is_none());
    assert_eq!(t.artifacts_when, ArtifactsWhen::OnSuccess);
}

#[test]
fn needs_make_a_dag_and_tasks_without_needs_are_roots() {
    let p = ok(r#"
parallelism = 3
[[task]]
name = "test"
run = "t"
needs = ["build"]
[[task]]
name = "build"
run = "b"
[[task]]
name = "lint"
run = "l"
[[task]]
name = "ship"
run = "s"
needs = ["test", "lint", "test"]
"#);
    let needs: Vec<&[usize]> = p.tasks.iter().map(|t| t.needs.as_slice()).collect();
    assert_eq!(needs, [&[1][..], &[], &[], &[0, 2]]);
    assert_eq!(p.parallelism, Some(3));
}

#[test]
fn unknown_needs_name_the_line_of_the_name() {
    assert_eq!(
        err("[[task]]\nname = \"a\"\nrun = \"x\"\nneeds = [\"a\", \"nope\"]\n"),
        ".surveil.toml: line 4, column 15: task `a`: `needs` names `nope`, which is not a task of this pipeline"
    );
}

#[test]
fn cycles_are_refused_naming_the_line_that_closes_them() {
    let e = err(
        "[[task]]\nname = \"a\"\nrun = \"x\"\nneeds = [\"c\"]\n[[task]]\nname = \"b\"\nrun = \"x\"\nneeds = [\"a\"]\n[[task]]\nname = \"c\"\nrun = \"x\"\nneeds = [\"b\"]\n",
    );
    assert_eq!(
        e,
        ".surveil.toml: line 8, column 10: task `b`: `needs` makes a cycle: a → c → b → a (each of these waits for the next)"
    );
    let e = err("[[task]]\nname = \"a\"\nrun = \"x\"\nneeds = [\"a\"]\n");
    assert!(
        e.starts_with(".surveil.toml: line 4, column 10: task `a`: `needs` makes a cycle: a → a"),
        "{e}"
    );
}

#[test]
fn needs_of_the_wrong_type_is_named() {
    let e = err("[[task]]\nname = \"a\"\nrun = \"x\"\nneeds = \"b\"\n");
    assert!(e.starts_with(".surveil.toml: line 4, column 9: "), "{e}");
    assert!(
        e.contains("invalid type: string \"b\", expected a sequence"),
        "{e}"
    );
}

#[test]
fn parallelism_must_be_a_positive_integer() {
    assert_eq!(
        err("parallelism = 0\n[[task]]\nname = \"a\"\nrun = \"x\"\n"),
        ".surveil.toml: line 1, column 15: `parallelism` must be between 1 and 1024, not 0"
    );
    assert_eq!(
        err("parallelism = \"2\"\n[[task]]\nname = \"a\"\nrun = \"x\"\n"),
        ".surveil.toml: line 1, column 15: `parallelism` must be a positive integer, not a string \"2\""
    );
}

#[test]
fn matrix_expands_in_file_order_with_values_in_the_environment() {
    let p = ok(r#"
[[task]]
name = "build"
run = "b"
[[task]]
name = "test"
run = "t"
needs = ["build"]
matrix = { toolchain = ["1.89", "stable"], os = ["a", "b"], n = [1] }
exclude = [{ toolchain = "1.89", os = "b" }]
[[task]]
name = "done"
run = "d"
needs = ["test"]
"#);
    assert_eq!(
        names(&p),
        [
            "build",
            "test (toolchain=1.89, os=a, n=1)",
            "test (toolchain=stable, os=a, n=1)",
            "test (toolchain=stable, os=b, n=1)",
            "done"
        ]
    );
    let t = &p.tasks[3];
    assert_eq!(t.env["toolchain"], "stable");
    assert_eq!(t.env["os"], "b");
    assert_eq!(t.env["n"], "1");
    assert_eq!(t.matrix[0], ("toolchain".to_owned(), "stable".to_owned()));
    assert_eq!(t.needs, [0]);
    assert_eq!(
        p.tasks[4].needs,
        [1, 2, 3],
        "a need on a matrix task waits for every combination"
    );
}

#[test]
fn matrix_without_needs_runs_its_combinations_side_by_side() {
    let p = ok(
        "[[task]]\nname = \"a\"\nrun = \"x\"\n[[task]]\nname = \"t\"\nrun = \"x\"\nmatrix = { v = [1, 2] }\n",
    );
    let needs: Vec<&[usize]> = p.tasks.iter().map(|t| t.needs.as_slice()).collect();
    assert_eq!(needs, [&[][..], &[0], &[0]]);
}

#[test]
fn matrix_errors_name_their_line() {
    let head = "[[task]]\nname = \"t\"\nrun = \"x\"\n";
    let cases = [
        (
            "matrix = {}\n",
            "line 4, column 10: task `t`: `matrix` must have at least one dimension",
        ),
        (
            "matrix = { v = [] }\n",
            "line 4, column 16: task `t`: matrix dimension `v` has no values",
        ),
        (
            "matrix = { v = \"1\" }\n",
            "line 4, column 16: task `t`: matrix dimension `v` must be an array of values",
        ),
        (
            "matrix = { v = [[1]] }\n",
            "line 4, column 16: task `t`: matrix dimension `v` has an array [1]; values are strings, numbers or booleans",
        ),
        (
            "matrix = { v = [1, 1] }\n",
            "line 4, column 16: task `t`: matrix dimension `v` lists `1` twice",
        ),
        (
            "matrix = { \"a-b\" = [1] }\n",
            "line 4, column 20: task `t`: matrix dimension `a-b` must be a variable name (letters, digits, _)",
        ),
        (
            "exclude = [{ v = 1 }]\n",
            "line 4, column 11: task `t`: `exclude` needs a `matrix` to exclude from",
        ),
        (
            "matrix = { v = [1] }\nexclude = [{ w = 1 }]\n",
            "line 5, column 12: task `t`: `exclude` names `w`, which is not a matrix dimension",
        ),
        (
            "matrix = { v = [1, 2] }\nexclude = [{ v = 3 }]\n",
            "line 5, column 12: task `t`: `exclude` has v = 3, which is not a value of the matrix",
        ),
        (
            "matrix = { v = [1] }\nexclude = [{ v = 1 }]\n",
            "line 5, column 11: task `t`: `exclude` removes every combination of the matrix",
        ),
    ];
    for (tail, want) in cases {
        assert_eq!(
            err(&format!("{head}{tail}")),
            format!(".surveil.toml: {want}"),
            "{tail}"
        );
    }
    let big = format!(
        "{head}matrix = {{ a = [{0}], b = [{0}], c = [{0}] }}\n",
        "1,2,3,4,5,6,7"
    );
    assert!(err(&big).ends_with("the matrix has more than 256 combinations"));
}

#[test]
fn a_matrix_name_may_not_collide_with_another_task() {
    let e = err(
        "[[task]]\nname = \"t (v=1)\"\nrun = \"x\"\n[[task]]\nname = \"t\"\nrun = \"x\"\nmatrix = { v = [1] }\n",
    );
    assert_eq!(
        e,
        ".surveil.toml: line 5, column 8: task `t (v=1)` (from the matrix of `t`) has the name of another task; task names must be unique"
    );
}

#[test]
fn labels_of_the_file_and_its_tasks_are_all_required() {
    let p = ok(
        "labels = [\"linux\"]\n[[task]]\nname = \"a\"\nrun = \"x\"\nlabels = [\"x86_64\", \"linux\"]\n[[task]]\nname = \"b\"\nrun = \"x\"\n",
    );
    assert_eq!(p.labels, ["linux", "x86_64"]);
    assert_eq!(p.tasks[0].labels, ["x86_64", "linux"]);
    assert_eq!(
        err("labels = [\"a b\"]\n[[task]]\nname = \"a\"\nrun = \"x\"\n"),
        ".surveil.toml: line 1, column 11: label `a b` must be 1 to 64 characters without spaces or commas"
    );
    assert_eq!(
        err("[[task]]\nname = \"a\"\nrun = \"x\"\nlabels = [\"\"]\n"),
        ".surveil.toml: line 4, column 11: task `a`: label `` must be 1 to 64 characters without spaces or commas"
    );
}

#[test]
fn artifacts_reports_and_when() {
    let p = ok(
        "[[task]]\nname = \"a\"\nrun = \"x\"\nartifacts = [\"target/release/app\", \"reports/*.xml\"]\nartifacts_when = \"always\"\nreports = [\"**/junit.xml\"]\n",
    );
    let t = &p.tasks[0];
    assert_eq!(t.artifacts, ["target/release/app", "reports/*.xml"]);
    assert_eq!(t.artifacts_when, ArtifactsWhen::Always);
    assert_eq!(t.reports, ["**/junit.xml"]);
    assert!(ArtifactsWhen::Always.keeps(false) && !ArtifactsWhen::OnSuccess.keeps(false));
    assert!(ArtifactsWhen::OnFailure.keeps(false) && !ArtifactsWhen::OnFailure.keeps(true));
    let head = "[[task]]\nname = \"a\"\nrun = \"x\"\n";
    let cases = [
        (
            "artifacts = [\"/etc/passwd\"]\n",
            "line 4, column 14: task `a`: `artifacts` pattern `/etc/passwd` is absolute; it must be relative to the checkout",
        ),
        (
            "artifacts = [\"../x\"]\n",
            "line 4, column 14: task `a`: `artifacts` pattern `../x` leaves the checkout (`..`)",
        ),
        (
            "reports = [\"a/[b\"]\n",
            "line 4, column 12: task `a`: `reports` pattern `a/[b` is not a glob pattern (unclosed character class; missing ']')",
        ),
        (
            "reports = [\"\"]\n",
            "line 4, column 12: task `a`: `reports` pattern `` is empty",
        ),
        (
            "artifacts_when = \"never\"\n",
            "line 4, column 18: task `a`: `artifacts_when` must be \"on_success\", \"on_failure\" or \"always\", not \"never\"",
        ),
    ];
    for (tail, want) in cases {
        assert_eq!(
            err(&format!("{head}{tail}")),
            format!(".surveil.toml: {want}"),
            "{tail}"
        );
    }
}

#[test]
fn cache_key_and_paths() {
    let p = ok(
        "[[task]]\nname = \"a\"\nrun = \"x\"\ncache = { key = \"cargo-{{ hashFiles('Cargo.lock', \\\"**/*.c\\\") }}-v1\", paths = [\"target/\", \".cargo/registry\"] }\n",
    );
    let cache = p.tasks[0].cache.as_ref().unwrap();
    assert_eq!(
        cache.key,
        [
            KeyPart::Text("cargo-".into()),
            KeyPart::HashFiles(vec!["Cargo.lock".into(), "**/*.c".into()]),
            KeyPart::Text("-v1".into()),
        ]
    );
    assert_eq!(cache.paths, ["target", ".cargo/registry"]);
    let head = "[[task]]\nname = \"a\"\nrun = \"x\"\n";
    let cases = [
        (
            "cache = { key = \"\", paths = [\"t\"] }\n",
            "line 4, column 17: task `a`: cache key must not be empty",
        ),
        (
            "cache = { key = \"k-{{ env('X') }}\", paths = [\"t\"] }\n",
            "line 4, column 17: task `a`: cache key `k-{{ env('X') }}`: `{{ env('X') }}` is not understood; the only expression is hashFiles('pattern', ...)",
        ),
        (
            "cache = { key = \"k-{{ hashFiles(x) }}\", paths = [\"t\"] }\n",
            "line 4, column 17: task `a`: cache key `k-{{ hashFiles(x) }}`: `{{ hashFiles(x) }}` has argument `x`; hashFiles takes quoted, non-empty patterns",
        ),
        (
            "cache = { key = \"k-{{ hashFiles('/x') }}\", paths = [\"t\"] }\n",
            "line 4, column 17: task `a`: cache key `k-{{ hashFiles('/x') }}`: `{{ hashFiles('/x') }}` pattern `/x` is absolute; it must be relative to the checkout",
        ),
        (
            "cache = { key = \"k-{{ hashFiles('x')\", paths = [\"t\"] }\n",
            "line 4, column 17: task `a`: cache key `k-{{ hashFiles('x')`: `{{` without its `}}`",
        ),
        (
            "cache = { key = \"k\", paths = [] }\n",
            "line 4, column 30: task `a`: cache `paths` must name at least one path",
        ),
        (
            "cache = { key = \"k\", paths = [\"~/.cargo\"] }\n",
            "line 4, column 31: task `a`: cache path `~/.cargo` is in HOME; only paths inside the checkout are kept (point the tool's cache there, e.g. CARGO_HOME=.cargo)",
        ),
        (
            "cache = { key = \"k\", paths = [\"t/*\"] }\n",
            "line 4, column 31: task `a`: cache path `t/*` is a pattern; cache paths are plain paths",
        ),
    ];
    for (tail, want) in cases {
        assert_eq!(
            err(&format!("{head}{tail}")),
            format!(".surveil.toml: {want}"),
            "{tail}"
        );
    }
    let e = err(&format!(
        "{head}cache = {{ key = \"k\", path = [\"t\"] }}\n"
    ));
    assert!(
        e.starts_with(".surveil.toml: line 4, column 22: ") && e.contains("unknown field `path`"),
        "{e}"
    );
    let e = err(&format!("{head}cache = {{ key = \"k\" }}\n"));
    assert!(
        e.contains("line 4") && e.contains("missing field `paths`"),
        "{e}"
    );
}
