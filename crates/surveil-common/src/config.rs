//! One way to read every binary's settings: command-line flags, then
//! `SURVEIL_<FLAG>` environment variables, then the `--config FILE` TOML,
//! then defaults.
//!
//! Flags and environment are clap's own job (each argument declares its
//! `env`). The file is merged *underneath* them by turning its settings into
//! flags placed before the real ones, for arguments that neither the command
//! line nor the environment set. That keeps one parser, one set of
//! validation messages (naming the flag) and one help text.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Parser};

/// The id of the config-file argument a binary declares (`--config`).
const CONFIG_ARG: &str = "config";
/// The environment variable that names a config file, like `--config`.
const CONFIG_ENV: &str = "SURVEIL_CONFIG";

/// A configuration file problem: unreadable, not TOML, or naming a setting
/// the binary does not have.
#[derive(Debug)]
pub struct ConfigFileError(pub String);

impl std::fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigFileError {}

/// Parses the process's arguments into `C`, merging the config file.
///
/// On any error it prints a message naming the flag or setting and exits
/// with code 2 (`--help` and `--version` exit 0), as the contract requires.
pub fn parse<C: Parser>() -> C {
    let env = |name: &str| std::env::var_os(name);
    match try_parse_from::<C>(std::env::args_os().collect(), &env) {
        Ok(config) => config,
        Err(ParseError::Clap(err)) => err.exit(),
        Err(ParseError::File(err)) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    }
}

/// Why [`try_parse_from`] failed.
#[derive(Debug)]
pub enum ParseError {
    /// A flag or value was wrong (clap's message names the flag).
    Clap(clap::Error),
    /// The config file could not be used.
    File(ConfigFileError),
}

/// [`parse`] without exiting, from explicit arguments (`args[0]` is the
/// program name) and an environment lookup, for tests.
pub fn try_parse_from<C: Parser>(
    args: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<C, ParseError> {
    let command = C::command();
    let has_config_arg = command
        .get_arguments()
        .any(|a| a.get_id().as_str() == CONFIG_ARG);
    let config_path = if has_config_arg {
        config_path_from_args(&args).or_else(|| env(CONFIG_ENV).map(PathBuf::from))
    } else {
        None
    };
    let Some(path) = config_path else {
        return parse_args::<C>(args);
    };
    let table = read_table(&path).map_err(ParseError::File)?;
    let merged = merge(&command, &args, &table, &path, env)?;
    parse_args::<C>(merged)
}

fn parse_args<C: Parser>(args: Vec<OsString>) -> Result<C, ParseError> {
    // Later occurrences win, so real flags override those the file supplied.
    let matches = C::command()
        .args_override_self(true)
        .try_get_matches_from(args)
        .map_err(ParseError::Clap)?;
    C::from_arg_matches(&matches).map_err(ParseError::Clap)
}

fn config_path_from_args(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_str()?;
        if arg == "--" {
            return None;
        }
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(value) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(value));
        }
    }
    None
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigFileError(format!("cannot read config file {}: {e}", path.display())))?;
    text.parse::<toml::Table>().map_err(|e| {
        ConfigFileError(format!(
            "config file {} is not valid TOML: {e}",
            path.display()
        ))
    })
}

fn merge(
    command: &clap::Command,
    args: &[OsString],
    table: &toml::Table,
    path: &Path,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Vec<OsString>, ParseError> {
    let mut file_flags = Vec::new();
    let mut file_positionals = Vec::new();
    let mut positional_ids = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_id().as_str() == key || a.get_long() == Some(long.as_str()))
            .filter(|a| a.get_id().as_str() != CONFIG_ARG && !a.is_hide_set())
            .ok_or_else(|| {
                ParseError::File(ConfigFileError(format!(
                    "config file {}: unknown setting `{key}`",
                    path.display()
                )))
            })?;
        if let Some(var) = arg.get_env()
            && env(&var.to_string_lossy()).is_some()
        {
            continue; // the environment outranks the file
        }
        let values = toml_values(value).map_err(|problem| {
            ParseError::File(ConfigFileError(format!(
                "config file {}: setting `{key}` {problem}",
                path.display()
            )))
        })?;
        if arg.is_positional() {
            positional_ids.push(arg.get_id().clone());
            file_positionals.extend(values);
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(&long));
        match arg.get_action() {
            ArgAction::SetTrue => {
                if values.iter().any(|v| v == "true") {
                    file_flags.push(OsString::from(&flag));
                }
            }
            ArgAction::SetFalse => {
                if values.iter().any(|v| v == "false") {
                    file_flags.push(OsString::from(&flag));
                }
            }
            ArgAction::Append | ArgAction::Count => {
                file_flags.extend(values.iter().map(|v| OsString::from(format!("{flag}={v}"))));
            }
            _ => {
                let joined = match arg.get_value_delimiter() {
                    Some(delim) => values.join(&delim.to_string()),
                    None if values.len() == 1 => values[0].clone(),
                    None => {
                        return Err(ParseError::File(ConfigFileError(format!(
                            "config file {}: setting `{key}` takes a single value",
                            path.display()
                        ))));
                    }
                };
                file_flags.push(OsString::from(format!("{flag}={joined}")));
            }
        }
    }

    let mut merged = Vec::with_capacity(args.len() + file_flags.len() + file_positionals.len() + 1);
    merged.push(
        args.first()
            .cloned()
            .unwrap_or_else(|| OsString::from("surveil")),
    );
    merged.extend(file_flags);
    merged.extend(args.iter().skip(1).cloned());
    if !file_positionals.is_empty() && !command_line_has_positionals(command, args, &positional_ids)
    {
        if !args.iter().any(|a| a == "--") {
            merged.push(OsString::from("--"));
        }
        merged.extend(file_positionals.into_iter().map(OsString::from));
    }
    Ok(merged)
}

/// Whether the real command line already gives the positional arguments,
/// found by parsing it with those arguments made optional.
fn command_line_has_positionals(
    command: &clap::Command,
    args: &[OsString],
    ids: &[clap::Id],
) -> bool {
    let mut relaxed = command.clone().ignore_errors(true);
    for id in ids {
        relaxed = relaxed.mut_arg(id.clone(), |a| a.required(false));
    }
    let matches: ArgMatches = match relaxed.try_get_matches_from(args) {
        Ok(m) => m,
        Err(_) => return false,
    };
    ids.iter()
        .any(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
}

fn toml_values(value: &toml::Value) -> Result<Vec<String>, &'static str> {
    match value {
        toml::Value::Array(items) => items
            .iter()
            .map(|item| scalar(item).ok_or("must hold only strings, numbers or booleans"))
            .collect(),
        other => scalar(other)
            .map(|s| vec![s])
            .ok_or("must be a string, number, boolean or array"),
    }
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    #[derive(Parser, Debug)]
    #[command(name = "demo")]
    struct Demo {
        #[arg(long, env = "SURVEIL_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "SURVEIL_RUNNER_TIMEOUT", default_value = "5s", value_parser = crate::parse_duration)]
        runner_timeout: Duration,
        #[arg(long, env = "SURVEIL_SLOTS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
        slots: u32,
        #[arg(long, env = "SURVEIL_LABELS", value_delimiter = ',')]
        labels: Vec<String>,
        #[arg(long, env = "SURVEIL_EVERY_COMMIT")]
        every_commit: bool,
        #[arg(required = true)]
        repos: Vec<String>,
    }

    fn run(args: &[&str], env: &[(&str, &str)], file: Option<&str>) -> Result<Demo, String> {
        let dir = tempfile::tempdir().unwrap();
        let mut argv: Vec<OsString> = vec!["demo".into()];
        if let Some(text) = file {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).unwrap();
            argv.push("--config".into());
            argv.push(path.into_os_string());
        }
        argv.extend(args.iter().map(OsString::from));
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.get(name).map(OsString::from);
        try_parse_from::<Demo>(argv, &lookup).map_err(|e| match e {
            ParseError::Clap(e) => e.to_string(),
            ParseError::File(e) => e.to_string(),
        })
    }

    #[test]
    fn file_fills_what_flags_do_not_set() {
        let d = run(
            &["/r"],
            &[],
            Some("runner_timeout = \"9s\"\nslots = 3\nlabels = [\"a\", \"b\"]\nevery_commit = true\n"),
        )
        .unwrap();
        assert_eq!(d.runner_timeout, Duration::from_secs(9));
        assert_eq!(d.slots, 3);
        assert_eq!(d.labels, vec!["a", "b"]);
        assert!(d.every_commit);
        assert_eq!(d.repos, vec!["/r"]);
    }

    #[test]
    fn flag_beats_file_and_file_beats_default() {
        let d = run(
            &["--slots", "4", "/r"],
            &[],
            Some("slots = 3\nrunner_timeout = \"2s\""),
        )
        .unwrap();
        assert_eq!(d.slots, 4);
        assert_eq!(d.runner_timeout, Duration::from_secs(2));
        let d = run(&["/r"], &[], None).unwrap();
        assert_eq!(d.runner_timeout, Duration::from_secs(5));
    }

    #[test]
    fn env_beats_file() {
        // clap reads the real environment for `env`; the lookup only decides
        // whether the file is overridden, so use a key clap will not see set
        // and check the file value was skipped.
        let d = run(&["/r"], &[("SURVEIL_SLOTS", "7")], Some("slots = 3")).unwrap();
        assert_eq!(
            d.slots, 1,
            "file value must be skipped when the env var is set"
        );
    }

    #[test]
    fn positionals_from_file_only_when_none_given() {
        let d = run(&[], &[], Some("repos = [\"/a\", \"/b\"]")).unwrap();
        assert_eq!(d.repos, vec!["/a", "/b"]);
        let d = run(&["/c"], &[], Some("repos = [\"/a\"]")).unwrap();
        assert_eq!(d.repos, vec!["/c"]);
    }

    #[test]
    fn errors_name_the_setting_or_flag() {
        let err = run(&["/r"], &[], Some("slot = 3")).unwrap_err();
        assert!(err.contains("unknown setting `slot`"), "{err}");
        let err = run(&["/r"], &[], Some("slots = 0")).unwrap_err();
        assert!(err.contains("--slots"), "{err}");
        let err = run(&["/r", "--runner-timeout", "soon"], &[], None).unwrap_err();
        assert!(
            err.contains("--runner-timeout") && err.contains("not a duration"),
            "{err}"
        );
        let err = run(&["/r"], &[], Some("slots = [")).unwrap_err();
        assert!(err.contains("not valid TOML"), "{err}");
    }
}
