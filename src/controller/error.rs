//! What can go wrong in a reconcile. Each variant maps to a metric label ([`Error::reason`]), an
//! Event reason, and a retry class ([`Error::class`]): a spec the operator cannot act on waits for
//! a change, anything else backs off and retries.

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

    /// An API request failed.
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
}

impl Error {
    pub fn api(verb: &'static str, kind: impl Into<String>, name: impl Into<String>, source: kube::Error) -> Self {
        Error::Api { verb, kind: kind.into(), name: name.into(), source }
    }

    /// The label of `mirrorfleet_reconcile_errors_total` and the Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::SecretMissing { .. } => "SecretMissing",
            Error::SecretKeyMissing { .. } => "SecretKeyMissing",
            Error::Api { source: kube::Error::Api(s), .. } if s.code == 409 => "Conflict",
            Error::Api { source: kube::Error::Api(s), .. } if s.code == 403 => "Forbidden",
            Error::Api { source: kube::Error::Api(s), .. } if s.code == 422 => "Rejected",
            Error::Api { .. } => "ApiError",
            Error::Serialize { .. } => "BuildError",
            Error::MissingMetadata(_) => "MissingMetadata",
        }
    }

    /// The API server refused a write for a reason a retry will not fix by itself (admission,
    /// quota, RBAC): worth a Ready=False and an Event, while retries go on.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Api { source: kube::Error::Api(s), .. } if matches!(s.code, 403 | 422))
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidSpec(_) | Error::SecretMissing { .. } | Error::SecretKeyMissing { .. } => {
                ErrorClass::WaitForChange
            }
            Error::Api { .. } | Error::Serialize { .. } | Error::MissingMetadata(_) => ErrorClass::Transient,
        }
    }
}

impl From<InvalidSpec> for Error {
    fn from(e: InvalidSpec) -> Self {
        Error::InvalidSpec(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
