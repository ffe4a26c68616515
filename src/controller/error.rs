//! What can go wrong in a reconcile. Each variant maps to a metric label ([`Error::reason`]), an
//! Event reason, and a retry class ([`Error::class`]): a spec the operator cannot act on waits for
//! a change, anything else backs off and retries. Errors that keep a mirror from converging say
//! so in its Ready condition ([`Error::shows_in_ready`]), also while retries go on.

use crate::api::validate::InvalidSpec;

/// How the controller retries after an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The spec (or a Secret it references) must change first; the watches bring that change.
    WaitForChange,
    /// API trouble (timeouts, conflicts, throttling): retry with per-object exponential backoff.
    Transient,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec fails validation that the CRD schema could not express.
    #[error("invalid spec: {0}")]
    InvalidSpec(#[source] InvalidSpec),

    /// A Secret named in the spec does not exist.
    #[error("{field}: Secret {name:?} does not exist")]
    SecretMissing { field: String, name: String },

    /// A Secret named in the spec lacks a key the spec needs. The key is named, its value never.
    #[error("{field}: Secret {name:?} has no key {key:?}")]
    SecretKeyMissing { field: String, name: String, key: String },

    /// Writing one of the mirror's children (apply, or delete of one the spec no longer asks
    /// for) failed: the fleet is not what the spec says until it goes through.
    #[error("{verb} {kind} {name}: {source}")]
    ChildWrite {
        verb: &'static str,
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    /// Any other API request failed.
    #[error("{verb} {kind} {name}: {source}")]
    Api {
        verb: &'static str,
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    /// A desired object could not be serialized (a bug in a builder).
    #[error("serializing {kind} {name}: {source}")]
    Serialize {
        kind: String,
        name: String,
        #[source]
        source: serde_json::Error,
    },

    /// The object lacks something the API server always sets (name, namespace, uid).
    #[error("RegistryMirror has no {0}")]
    MissingMetadata(&'static str),

    /// Another mirror that came first configures one of this mirror's registries on nodes this
    /// one selects too ([`crate::api::conflicts`]).
    #[error("{0}")]
    NodeConfigConflict(String),
}

impl Error {
    pub fn api(verb: &'static str, kind: impl Into<String>, name: impl Into<String>, source: kube::Error) -> Self {
        Error::Api { verb, kind: kind.into(), name: name.into(), source }
    }

    pub fn child_write(
        verb: &'static str,
        kind: impl Into<String>,
        name: impl Into<String>,
        source: kube::Error,
    ) -> Self {
        Error::ChildWrite { verb, kind: kind.into(), name: name.into(), source }
    }

    /// The API server's answer, for the API errors.
    fn api_status(&self) -> Option<&kube::core::Status> {
        match self {
            Error::ChildWrite { source: kube::Error::Api(s), .. } | Error::Api { source: kube::Error::Api(s), .. } => {
                Some(s)
            }
            _ => None,
        }
    }

    /// The label of `mirrorfleet_reconcile_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::SecretMissing { .. } => "SecretMissing",
            Error::SecretKeyMissing { .. } => "SecretKeyMissing",
            Error::ChildWrite { .. } | Error::Api { .. } => match self.api_status().map(|s| s.code) {
                Some(409) => "Conflict",
                Some(403) => "Forbidden",
                Some(422) => "Rejected",
                _ => "ApiError",
            },
            Error::Serialize { .. } => "BuildError",
            Error::MissingMetadata(_) => "MissingMetadata",
            Error::NodeConfigConflict(_) => "NodeConfigConflict",
        }
    }

    /// The API server refused a write for a reason a retry will not fix by itself (admission,
    /// quota, RBAC).
    pub fn is_refusal(&self) -> bool {
        self.api_status().is_some_and(|s| matches!(s.code, 403 | 422))
    }

    /// Whether the mirror's Ready condition (and an Event) should say so while retries go on: a
    /// child that cannot be written, whatever the API server answered (the mirror does not
    /// converge until it is), or the API server refusing any other write.
    pub fn shows_in_ready(&self) -> bool {
        matches!(self, Error::ChildWrite { .. }) || self.is_refusal()
    }

    /// The reason of Ready=False for this error (and of the Event that announces it).
    pub fn ready_reason(&self) -> &'static str {
        match self {
            Error::ChildWrite { .. } => "ApplyFailed",
            _ => self.reason(),
        }
    }

    /// The message of Ready=False: what failed and the API server's own message, without the
    /// debug dump of its answer that the error's Display carries.
    pub fn ready_message(&self) -> String {
        match self {
            Error::ChildWrite { verb, kind, name, source } | Error::Api { verb, kind, name, source } => {
                let what = format!("{verb} {kind} {name}");
                match source {
                    kube::Error::Api(s) if s.message.is_empty() => format!("{what}: {} ({})", s.reason, s.code),
                    kube::Error::Api(s) => format!("{what}: {} ({}, {})", s.message, s.reason, s.code),
                    other => format!("{what}: {other}"),
                }
            }
            other => other.to_string(),
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidSpec(_)
            | Error::SecretMissing { .. }
            | Error::SecretKeyMissing { .. }
            | Error::NodeConfigConflict(_) => ErrorClass::WaitForChange,
            Error::ChildWrite { .. } | Error::Api { .. } | Error::Serialize { .. } | Error::MissingMetadata(_) => {
                ErrorClass::Transient
            }
        }
    }
}

/// Redacts what a Secret holds from the API server's answer to a write of it: an admission
/// webhook may quote the object it was sent, and the answer goes to the status, Events and logs.
/// `secret` is the body sent; its `data` values are taken out as sent (base64) and decoded, line
/// by line too.
pub fn redact_secret_values(source: kube::Error, secret: &serde_json::Value) -> kube::Error {
    let kube::Error::Api(mut status) = source else { return source };
    let values = secret_values(secret);
    let redact = |s: &mut String| {
        for v in &values {
            if s.contains(v.as_str()) {
                *s = s.replace(v.as_str(), "(redacted)");
            }
        }
    };
    redact(&mut status.message);
    if let Some(details) = status.details.as_mut() {
        for cause in &mut details.causes {
            redact(&mut cause.message);
            redact(&mut cause.field);
        }
    }
    kube::Error::Api(status)
}

fn secret_values(secret: &serde_json::Value) -> Vec<String> {
    use base64::Engine;
    // Shorter strings would take ordinary words out of the message; what the operator keeps in
    // Secrets (htpasswd lines, an Authorization header) is far longer.
    const SHORTEST: usize = 6;
    let mut values = Vec::new();
    let strings = |key: &str| {
        secret[key]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.as_str().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let decoded = strings("data").into_iter().flat_map(|b64| {
        let plain = base64::engine::general_purpose::STANDARD.decode(&b64).ok().and_then(|b| String::from_utf8(b).ok());
        [Some(b64), plain].into_iter().flatten()
    });
    for value in decoded.chain(strings("stringData")) {
        values.extend(value.lines().map(str::to_string));
        values.push(value);
    }
    values.retain(|v| v.len() >= SHORTEST);
    // Longest first, so no part of a value is left behind by a shorter one redacted inside it.
    values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    values.dedup();
    values
}

impl From<InvalidSpec> for Error {
    fn from(e: InvalidSpec) -> Self {
        Error::InvalidSpec(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
