//! Diagnostics: every problem the agent finds in its input, said so a user can fix it.
//!
//! The same words end up in logs (manifest mode) and in Kubernetes Events (kube mode), so a
//! diagnostic is plain data: comparable in tests and serializable.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Severity {
    /// Something the user asked for is not done (or not done as asked).
    Error,
    /// Done, but probably not what the user meant.
    Warning,
    /// Worth knowing, e.g. why a Service is left alone.
    Info,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        })
    }
}

/// Where the problem was read from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Origin {
    /// A manifest file. `line` is 1-based (the document's first content line, or the line a
    /// parser reported); `document` is the 0-based index of the YAML document in the file.
    /// Both are absent for problems with the whole file or directory.
    Manifest {
        /// Shared (Arc): every object of a file and everything made from them name it.
        file: Arc<Path>,
        line: Option<usize>,
        document: Option<usize>,
    },
    /// An object read from the Kubernetes API; [`Diagnostic::object`] names it.
    Cluster,
}

impl Origin {
    pub fn file(file: impl Into<PathBuf>) -> Self {
        Origin::Manifest {
            file: Arc::from(file.into()),
            line: None,
            document: None,
        }
    }

    pub fn document(file: impl Into<PathBuf>, line: usize, document: usize) -> Self {
        Origin::Manifest {
            file: Arc::from(file.into()),
            line: Some(line),
            document: Some(document),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Manifest {
                file,
                line: Some(line),
                ..
            } => write!(f, "{}:{line}", file.display()),
            Origin::Manifest {
                file, line: None, ..
            } => write!(f, "{}", file.display()),
            Origin::Cluster => f.write_str("cluster"),
        }
    }
}

/// A Kubernetes object by kind, namespace and name. `namespace` is empty for cluster-scoped
/// kinds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Static for the kinds extproxy reads; the names are shared with the keys made from them.
    pub kind: Cow<'static, str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectRef {
    pub fn new(
        kind: impl Into<Cow<'static, str>>,
        namespace: impl AsRef<str>,
        name: impl AsRef<str>,
    ) -> Self {
        ObjectRef {
            kind: kind.into(),
            namespace: namespace.as_ref().into(),
            name: name.as_ref().into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub origin: Origin,
    pub object: Option<ObjectRef>,
    /// Path of the offending field inside the object, e.g. `subsets[0].addresses[0].ip`.
    pub field: Option<String>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(
        severity: Severity,
        origin: Origin,
        object: Option<ObjectRef>,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity,
            origin,
            object,
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.origin != Origin::Cluster {
            write!(f, "{}: ", self.origin)?;
        }
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// An object at a known place: the context most diagnostics are made in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub origin: Origin,
    pub object: ObjectRef,
}

impl Site {
    pub fn new(origin: Origin, object: ObjectRef) -> Self {
        Site { origin, object }
    }

    pub fn diagnostic(
        &self,
        severity: Severity,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Diagnostic {
        Diagnostic::new(
            severity,
            self.origin.clone(),
            Some(self.object.clone()),
            field.map(str::to_owned),
            message,
        )
    }

    pub fn error(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Error, Some(field), message)
    }

    pub fn warning(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Warning, Some(field), message)
    }

    pub fn info(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Info, Some(field), message)
    }
}

/// True if any diagnostic is an error (the agent's exit status in one-shot mode).
pub fn has_errors(diagnostics: &[Diagnostic]) -> bool {
    diagnostics.iter().any(|d| d.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_place_object_and_field() {
        let d = Diagnostic::new(
            Severity::Error,
            Origin::document("manifests/seed.yaml", 23, 0),
            Some(ObjectRef::new("Endpoints", "default", "myapp-proxy")),
            Some("subsets[0].addresses[0].ip".into()),
            "\"2.3.4.5k\" is not an IP address",
        );
        assert_eq!(
            d.to_string(),
            "manifests/seed.yaml:23: Endpoints default/myapp-proxy: subsets[0].addresses[0].ip: \"2.3.4.5k\" is not an IP address"
        );
    }

    #[test]
    fn display_leaves_out_what_is_unknown() {
        let whole_file = Diagnostic::new(
            Severity::Error,
            Origin::file("m/x.yaml"),
            None,
            None,
            "unreadable",
        );
        assert_eq!(whole_file.to_string(), "m/x.yaml: unreadable");
        let cluster = Site::new(Origin::Cluster, ObjectRef::new("Namespace", "", "shop"))
            .info("metadata", "hi");
        assert_eq!(cluster.to_string(), "Namespace shop: metadata: hi");
    }

    #[test]
    fn diagnostics_round_trip_through_json() {
        let d = Site::new(
            Origin::document("a.yaml", 3, 1),
            ObjectRef::new("Service", "default", "x"),
        )
        .warning("spec.ports[0].protocol", "SCTP is not proxied");
        let json = serde_json::to_string(&d).expect("serialize");
        let back: Diagnostic = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, d);
        assert!(!has_errors(&[d]));
    }
}
