//! Signature checks over the raw body, in constant time: GitHub's
//! `X-Hub-Signature-256: sha256=<hex HMAC-SHA256>`, Gitea's and Forgejo's
//! `X-Gitea-Signature` / `X-Forgejo-Signature: <hex HMAC-SHA256>`, and
//! GitLab's `X-Gitlab-Token: <secret>`. Errors name the header and what is
//! wrong with it, never the secret nor the value received.

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::payload::{self, ParseError, Parsed, Repository};
use super::{ForgeKind, detect};

/// A webhook secret. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The secret as a file holds it: surrounding whitespace trimmed.
    /// `None` when nothing is left (an empty secret signs nothing).
    pub fn from_text(text: &str) -> Option<Self> {
        let text = text.trim();
        (!text.is_empty()).then(|| Secret(text.as_bytes().to_vec()))
    }
}

/// What is wrong with a signature header's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    /// GitHub's value must start with `sha256=`.
    #[error("it does not start with `sha256=`")]
    MissingPrefix,
    /// Gitea and Forgejo send bare hex.
    #[error("it has a prefix; the bare hex digest is expected")]
    UnexpectedPrefix,
    /// A character that is not a hex digit.
    #[error("character {position} is not a hex digit")]
    NotHex {
        /// Its position (from 0) in the digest.
        position: usize,
    },
    /// Not 64 hex digits (truncated, or another hash).
    #[error("it has {digits} hex digits, not 64")]
    WrongLength {
        /// How many there are.
        digits: usize,
    },
    /// Not visible ASCII.
    #[error("it is not ASCII text")]
    NotText,
    /// The header came more than once.
    #[error("it appears more than once")]
    Repeated,
}

/// Why a webhook is not accepted as authentic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No forge event header at all.
    #[error(
        "not a forge webhook: no X-GitHub-Event, X-Gitea-Event, X-Forgejo-Event or X-Gitlab-Event header"
    )]
    NotAWebhook,
    /// The forge did not sign it.
    #[error("{forge} webhook without {header}: set the secret on the forge's webhook settings")]
    Unsigned {
        /// The forge.
        forge: ForgeKind,
        /// The header that is missing.
        header: &'static str,
    },
    /// GitHub sent only the SHA-1 signature, which is not accepted.
    #[error(
        "GitHub webhook signed with SHA-1 only (X-Hub-Signature): X-Hub-Signature-256 is required"
    )]
    Sha1Only,
    /// The signature header cannot be a signature.
    #[error("{forge} webhook: {header} is malformed: {problem}")]
    Malformed {
        /// The forge.
        forge: ForgeKind,
        /// The header.
        header: &'static str,
        /// What is wrong.
        problem: SignatureProblem,
    },
    /// A well-formed signature made with another secret (or over another
    /// body).
    #[error(
        "{forge} webhook: {header} does not match this repository's secret (or the body was altered)"
    )]
    Mismatch {
        /// The forge.
        forge: ForgeKind,
        /// The header.
        header: &'static str,
    },
    /// [`verify_with`] found no secret for the repository the payload names.
    #[error("{forge} webhook for {repository}, which has no webhook secret configured")]
    UnknownRepository {
        /// The forge.
        forge: ForgeKind,
        /// The repository's full name as the payload gives it.
        repository: String,
    },
    /// [`verify_with`] could not read the repository from the payload.
    #[error(transparent)]
    Payload(#[from] ParseError),
}

/// A request whose signature held: the only way to its [`Parsed`] hint.
#[derive(Debug, Clone, Copy)]
pub struct Verified<'a> {
    forge: ForgeKind,
    headers: &'a HeaderMap,
    body: &'a [u8],
}

impl Verified<'_> {
    /// The forge that signed it.
    pub fn forge(&self) -> ForgeKind {
        self.forge
    }

    /// What it hints at, or why it is ignored.
    pub fn parse(&self) -> Result<Parsed, ParseError> {
        payload::parse(self.forge, self.headers, self.body)
    }
}

/// Checks the signature of a request against `secret`.
pub fn verify<'a>(
    headers: &'a HeaderMap,
    body: &'a [u8],
    secret: &Secret,
) -> Result<Verified<'a>, VerifyError> {
    let forge = detect(headers).ok_or(VerifyError::NotAWebhook)?;
    let header = forge.signature_header();
    let malformed = |problem| VerifyError::Malformed {
        forge,
        header,
        problem,
    };
    let mut values = headers.get_all(header).iter();
    let Some(value) = values.next() else {
        if forge == ForgeKind::GitHub && headers.contains_key("x-hub-signature") {
            return Err(VerifyError::Sha1Only);
        }
        return Err(VerifyError::Unsigned { forge, header });
    };
    if values.next().is_some() {
        return Err(malformed(SignatureProblem::Repeated));
    }
    let value = value
        .to_str()
        .map_err(|_| malformed(SignatureProblem::NotText))?;
    let authentic = match forge {
        ForgeKind::GitLab => tokens_equal(value.as_bytes(), &secret.0),
        ForgeKind::GitHub => {
            let hex = value
                .strip_prefix("sha256=")
                .ok_or(malformed(SignatureProblem::MissingPrefix))?;
            hmac_matches(&secret.0, body, &decode_digest(hex).map_err(malformed)?)
        }
        ForgeKind::Gitea | ForgeKind::Forgejo => {
            if value.contains('=') {
                return Err(malformed(SignatureProblem::UnexpectedPrefix));
            }
            hmac_matches(&secret.0, body, &decode_digest(value).map_err(malformed)?)
        }
    };
    if !authentic {
        return Err(VerifyError::Mismatch { forge, header });
    }
    Ok(Verified {
        forge,
        headers,
        body,
    })
}

/// Like [`verify`], with the secret of the repository the payload names:
/// `secret_for` gets the forge and the (not yet trusted) repository and
/// answers its secret, if it has one.
pub fn verify_with<'a, 's>(
    headers: &'a HeaderMap,
    body: &'a [u8],
    secret_for: impl FnOnce(ForgeKind, &Repository) -> Option<&'s Secret>,
) -> Result<Verified<'a>, VerifyError> {
    let forge = detect(headers).ok_or(VerifyError::NotAWebhook)?;
    let repository = payload::repository(forge, headers, body)?;
    let secret = secret_for(forge, &repository).ok_or_else(|| VerifyError::UnknownRepository {
        forge,
        repository: repository.full_name.clone(),
    })?;
    verify(headers, body, secret)
}

fn hmac_matches(secret: &[u8], body: &[u8], claimed: &[u8; 32]) -> bool {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(claimed).is_ok()
}

/// Equal tokens, in time that depends on neither's content nor length:
/// the digests are compared, not the tokens.
fn tokens_equal(given: &[u8], secret: &[u8]) -> bool {
    Sha256::digest(given).ct_eq(&Sha256::digest(secret)).into()
}

fn decode_digest(hex: &str) -> Result<[u8; 32], SignatureProblem> {
    if let Some(position) = hex.bytes().position(|b| !b.is_ascii_hexdigit()) {
        return Err(SignatureProblem::NotHex { position });
    }
    if hex.len() != 64 {
        return Err(SignatureProblem::WrongLength { digits: hex.len() });
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let text = std::str::from_utf8(pair).expect("hex digits are ASCII");
        *byte = u8::from_str_radix(text, 16).expect("checked hex digits");
    }
    Ok(digest)
}
