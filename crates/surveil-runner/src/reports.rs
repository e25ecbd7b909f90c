//! JUnit XML test reports: the counts and failing test names of the files
//! a task's `reports` patterns match, for its [`TestReport`].
//!
//! Reads files only (with quick-xml); a file that cannot be read or
//! parsed is named in the report's `problems`, never a reason to fail the
//! task. It must not run while a task of the job still runs (see
//! [`crate::files`]).

use std::path::Path;

use quick_xml::events::{BytesStart, Event};
use surveil_proto::TestReport;

/// A larger report file is not read.
pub const MAX_REPORT_BYTES: u64 = 32 * 1024 * 1024;

/// Failing names kept per task; the counts stay exact.
pub const MAX_FAILING: usize = 100;

/// The summed report of the files under `root` matching `patterns`;
/// `None` when the task has no `reports` or no file matched.
pub fn collect(root: &Path, patterns: &[String]) -> Option<TestReport> {
    if patterns.is_empty() {
        return None;
    }
    let mut report = TestReport::default();
    let files = match crate::files::matching(root, patterns) {
        Ok(files) => files,
        Err(e) => {
            report
                .problems
                .push(format!("cannot search for reports: {e}"));
            return Some(report);
        }
    };
    if files.is_empty() {
        return None;
    }
    for file in files {
        let path = root.join(&file);
        let read = match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > MAX_REPORT_BYTES => Err(format!(
                "is {} bytes; the limit is {MAX_REPORT_BYTES}",
                meta.len()
            )),
            _ => std::fs::read_to_string(&path).map_err(|e| e.to_string()),
        };
        if let Err(problem) = read.and_then(|text| add(&text, &mut report)) {
            report.problems.push(format!("{file}: {problem}"));
        }
    }
    Some(report)
}

/// Adds the test cases of one JUnit document to `report`.
pub fn add(xml: &str, report: &mut TestReport) -> Result<(), String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().trim_text(true);
    // (name, outcome) of the open <testcase>.
    let mut case: Option<(String, Outcome)> = None;
    let mut found = TestReport::default();
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("not JUnit XML: {e} (at byte {})", reader.buffer_position()))?;
        match event {
            Event::Start(e) if e.name().as_ref() == b"testcase" => {
                case = Some((case_name(&e)?, Outcome::Passed));
            }
            Event::Empty(e) if e.name().as_ref() == b"testcase" => {
                count(&mut found, case_name(&e)?, Outcome::Passed);
            }
            Event::Start(e) | Event::Empty(e) => {
                if let Some((_, outcome)) = case.as_mut() {
                    match e.name().as_ref() {
                        b"failure" | b"error" => *outcome = Outcome::Failed,
                        b"skipped" if *outcome == Outcome::Passed => *outcome = Outcome::Skipped,
                        _ => {}
                    }
                }
            }
            Event::End(e) if e.name().as_ref() == b"testcase" => {
                if let Some((name, outcome)) = case.take() {
                    count(&mut found, name, outcome);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    report.passed += found.passed;
    report.failed += found.failed;
    report.skipped += found.skipped;
    for name in found.failing {
        if report.failing.len() < MAX_FAILING {
            report.failing.push(name);
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Failed,
    Skipped,
}

fn count(report: &mut TestReport, name: String, outcome: Outcome) {
    match outcome {
        Outcome::Passed => report.passed += 1,
        Outcome::Skipped => report.skipped += 1,
        Outcome::Failed => {
            report.failed += 1;
            if report.failing.len() < MAX_FAILING {
                report.failing.push(name);
            }
        }
    }
}

/// `classname.name`, or `name` alone when there is no class.
fn case_name(e: &BytesStart<'_>) -> Result<String, String> {
    let attr = |key: &str| -> Result<String, String> {
        match e.try_get_attribute(key).map_err(|e| e.to_string())? {
            Some(a) => a
                .unescape_value()
                .map(|v| v.into_owned())
                .map_err(|e| e.to_string()),
            None => Ok(String::new()),
        }
    };
    let (class, name) = (attr("classname")?, attr("name")?);
    Ok(if class.is_empty() {
        name
    } else {
        format!("{class}.{name}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4"><testcase classname="test_app" name="test_ok" time="0.001" /><testcase classname="test_app" name="test_bad" time="0.001"><failure message="assert 1 == 2">x</failure></testcase><testcase classname="test_app" name="test_skip"><skipped type="pytest.skip" message="no">skip</skipped></testcase><testcase classname="test_app" name="test_err"><error message="boom"/></testcase><testcase name="plain"></testcase></testsuite></testsuites>"#;

    #[test]
    fn counts_and_failing_names() {
        let mut report = TestReport::default();
        add(PYTEST, &mut report).unwrap();
        assert_eq!((report.passed, report.failed, report.skipped), (2, 2, 1));
        assert_eq!(report.failing, ["test_app.test_bad", "test_app.test_err"]);
    }

    #[test]
    fn files_by_pattern_are_summed_and_broken_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/junit.xml"), PYTEST).unwrap();
        std::fs::write(dir.path().join("junit.xml"), PYTEST).unwrap();
        std::fs::write(
            dir.path().join("b-junit.xml"),
            "<testsuite><testcase name='x'></testsuite>",
        )
        .unwrap();
        let report = collect(dir.path(), &["**/junit.xml".into(), "b-junit.xml".into()]).unwrap();
        assert_eq!((report.passed, report.failed, report.skipped), (4, 4, 2));
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            report.problems[0].starts_with("b-junit.xml: not JUnit XML"),
            "{:?}",
            report.problems
        );
        assert_eq!(collect(dir.path(), &["none/*.xml".into()]), None);
        assert_eq!(collect(dir.path(), &[]), None);
    }
}
