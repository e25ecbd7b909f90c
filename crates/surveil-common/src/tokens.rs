//! The tokens file (`--tokens-file`): one entry per credential — a name, a
//! role (`runner`, `observer`, `client`), for clients a scope (`read` or
//! `operate`), and the SHA-256 of the secret, never the secret itself.
//! Read by the dispatcher, edited by `surveil token add/revoke`.
//!
//! Why a plain SHA-256 is enough: secrets are generated here, 256 random
//! bits each, never chosen by a person. Slow password hashes (argon2,
//! bcrypt) exist to make guessing *low-entropy* passwords expensive; no
//! amount of hashing speed lets anyone search 2^256 secrets, so a fast,
//! well-studied hash loses nothing and keeps each handshake cheap.
//!
//! This module parses, validates and writes the file (atomically, 0600,
//! through [`crate::private`]); it never decides what a role may do.

use std::fmt;
use std::path::Path;

use anyhow::{Context, bail};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Secret;
use crate::private;

/// What a secret is prefixed with, so secret scanners and people can tell
/// a Surveil token at a glance.
pub const SECRET_PREFIX: &str = "svt_";

/// The role a credential may connect as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Builds jobs, under the credential's name only.
    Runner,
    /// Submits commits.
    Observer,
    /// Queries and, with scope `operate`, acts on jobs.
    Client,
}

impl Role {
    /// The role's name as the file and the command line write it.
    pub fn label(self) -> &'static str {
        match self {
            Role::Runner => "runner",
            Role::Observer => "observer",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What a client credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Jobs, logs, runners, status.
    Read,
    /// Everything `read` may, plus submit, cancel, rerun, prune.
    Operate,
}

impl Scope {
    /// The scope's name as the file and the command line write it.
    pub fn label(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Operate => "operate",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Unique in the file; a runner's is the only name it may use.
    pub name: String,
    /// The role it may connect as.
    pub role: Role,
    /// For a client: what it may do. Absent for the other roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Lower-case hex SHA-256 of the secret.
    pub sha256: String,
    /// When it was issued (RFC 3339), for people rotating credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// The credentials, in the file's order.
    #[serde(default, rename = "token")]
    pub tokens: Vec<Entry>,
}

const HEADER: &str = "# Surveil credentials (--tokens-file), edited by `surveil token add` and\n\
# `surveil token revoke`. Each entry holds the SHA-256 of its secret, never\n\
# the secret. Keep this file 0600; the dispatcher reloads it when it changes.\n\n";

/// The lower-case hex SHA-256 of `secret`.
pub fn hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new secret: the prefix and 256 bits from the OS-seeded CSPRNG, in hex.
pub fn generate() -> Secret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Secret::new(format!("{SECRET_PREFIX}{hex}"))
}

impl TokensFile {
    /// Parses and validates the text of a tokens file.
    pub fn parse(text: &str) -> anyhow::Result<TokensFile> {
        let file: TokensFile = toml::from_str(text).context("not a valid tokens file")?;
        file.validate()?;
        Ok(file)
    }

    /// Reads `path` (refusing it when group or others may read it).
    pub fn load(path: &Path) -> anyhow::Result<TokensFile> {
        let text = private::read_credential(path, crate::credentials_dir().as_deref())?;
        TokensFile::parse(&text).with_context(|| format!("tokens file {}", path.display()))
    }

    /// Every problem with the entries: names unique and usable, hashes
    /// well formed, a scope exactly for clients.
    fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, entry) in self.tokens.iter().enumerate() {
            let at = format!("token #{} ({:?})", i + 1, entry.name);
            if let Err(problem) = check_name(&entry.name) {
                problems.push(format!("{at}: {problem}"));
            }
            if !seen.insert(entry.name.as_str()) {
                problems.push(format!("{at}: the name is used by an earlier entry"));
            }
            if entry.sha256.len() != 64 || !entry.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                problems.push(format!("{at}: sha256 must be 64 hex digits"));
            }
            match (entry.role, entry.scope) {
                (Role::Client, None) => {
                    problems.push(format!(
                        "{at}: a client needs scope = \"read\" or \"operate\""
                    ));
                }
                (Role::Runner | Role::Observer, Some(_)) => problems.push(format!(
                    "{at}: scope applies to clients only, not to a {}",
                    entry.role
                )),
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }

    /// The file's text: a header, then the entries.
    pub fn render(&self) -> String {
        let body = toml::to_string(self).expect("a tokens file serialises");
        format!("{HEADER}{body}")
    }

    /// Writes the file atomically, 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        private::write_atomic(path, self.render().as_bytes())
            .with_context(|| format!("writing tokens file {}", path.display()))
    }
}

/// A usable credential name: what runners are called, so what `--name`
/// accepts and a log line can show without quoting.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("a name has 1 to 128 characters".to_owned());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
    {
        return Err("a name has only letters, digits and - _ . @".to_owned());
    }
    Ok(())
}

/// Adds a credential to the file at `path` (created 0600 if missing) and
/// returns its secret, which exists nowhere else: the caller shows it once.
pub fn add(path: &Path, name: &str, role: Role, scope: Option<Scope>) -> anyhow::Result<Secret> {
    let mut file = load_or_empty(path)?;
    if file.tokens.iter().any(|t| t.name == name) {
        bail!(
            "{} already has a token named {name:?}; revoke it first to issue a new one (`surveil token revoke --tokens-file {} {name}`)",
            path.display(),
            path.display()
        );
    }
    let scope = match (role, scope) {
        (Role::Client, None) => bail!("a client token needs --scope read or --scope operate"),
        (Role::Client, scope) => scope,
        (_, Some(_)) => bail!("--scope applies to client tokens only"),
        (_, None) => None,
    };
    let secret = generate();
    file.tokens.push(Entry {
        name: name.to_owned(),
        role,
        scope,
        sha256: hash(secret.expose()),
        created: Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()),
    });
    file.validate()?;
    file.save(path)?;
    Ok(secret)
}

/// Removes the credential called `name`; `false` when there was none.
pub fn revoke(path: &Path, name: &str) -> anyhow::Result<bool> {
    let mut file = TokensFile::load(path)?;
    let before = file.tokens.len();
    file.tokens.retain(|t| t.name != name);
    if file.tokens.len() == before {
        return Ok(false);
    }
    file.save(path)?;
    Ok(true)
}

fn load_or_empty(path: &Path) -> anyhow::Result<TokensFile> {
    match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(TokensFile::default()),
        _ => TokensFile::load(path),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn add_writes_only_the_hash_and_revoke_removes_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let ci = add(&path, "ci-1", Role::Runner, None).unwrap();
        let alice = add(&path, "alice", Role::Client, Some(Scope::Read)).unwrap();
        assert!(ci.expose().starts_with(SECRET_PREFIX));
        assert_eq!(ci.expose().len(), SECRET_PREFIX.len() + 64);
        assert_ne!(ci.expose(), alice.expose());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(ci.expose()) && !text.contains(alice.expose()),
            "{text}"
        );
        assert!(text.contains(&hash(ci.expose())), "{text}");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let file = TokensFile::load(&path).unwrap();
        assert_eq!(file.tokens.len(), 2);
        assert_eq!(file.tokens[1].scope, Some(Scope::Read));

        let err = add(&path, "ci-1", Role::Runner, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already has a token named \"ci-1\""), "{err}");
        assert!(revoke(&path, "ci-1").unwrap());
        assert!(!revoke(&path, "ci-1").unwrap());
        let file = TokensFile::load(&path).unwrap();
        assert_eq!(file.tokens.len(), 1);
        assert_eq!(file.tokens[0].name, "alice");
    }

    #[test]
    fn scopes_belong_to_clients_and_problems_name_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let err = add(&path, "a", Role::Client, None).unwrap_err().to_string();
        assert!(err.contains("needs --scope"), "{err}");
        let err = add(&path, "a", Role::Runner, Some(Scope::Read))
            .unwrap_err()
            .to_string();
        assert!(err.contains("client tokens only"), "{err}");
        let err = add(&path, "a b", Role::Runner, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only letters"), "{err}");

        let h = "ab".repeat(32);
        let text = format!(
            "[[token]]\nname = \"x\"\nrole = \"client\"\nsha256 = \"{h}\"\n\
             [[token]]\nname = \"x\"\nrole = \"runner\"\nscope = \"read\"\nsha256 = \"12\"\n"
        );
        let err = format!("{:#}", TokensFile::parse(&text).unwrap_err());
        assert!(
            err.contains("token #1 (\"x\"): a client needs scope"),
            "{err}"
        );
        assert!(err.contains("token #2 (\"x\"): the name is used"), "{err}");
        assert!(err.contains("sha256 must be 64 hex digits"), "{err}");
        assert!(err.contains("scope applies to clients only"), "{err}");
        let err = format!(
            "{:#}",
            TokensFile::parse("[[token]]\nname = 1\n").unwrap_err()
        );
        assert!(err.contains("not a valid tokens file"), "{err}");
    }

    #[test]
    fn the_hash_is_sha256() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
