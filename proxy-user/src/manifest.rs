//! The no-cluster mode's input: a folder of Kubernetes manifests.
//!
//! Files are parsed one at a time so a watcher re-parses only what changed ([`ManifestSet`]).
//! Every problem becomes a [`Diagnostic`] and the rest is still served: a malformed document does
//! not hide the documents around it, and an invalid address does not hide the valid ones.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort as SlicePort};
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::diag::{Diagnostic, ObjectRef, Origin, Severity, Site};
use crate::names::{MANAGED_BY_LABEL, MIRRORING_CONTROLLER, SERVICE_NAME_LABEL, SKIP_MIRROR_LABEL};
use crate::objects::{EndpointObject, EndpointsObject, Kept, Meta, ServiceObject, SliceObject};
use crate::translate::{Incremental, Inventory, ObjectKey, Seniority, Sourced};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: io::Error },
}

/// Reads every manifest file of `dir` (not recursive). An unreadable directory is reported as a
/// diagnostic with an empty inventory.
pub fn load_dir(dir: &Path) -> (Inventory, Vec<Diagnostic>) {
    match ManifestSet::read_dir(dir) {
        Ok(set) => set.inventory(),
        Err(err) => (
            Inventory::default(),
            vec![Diagnostic::new(
                Severity::Error,
                Origin::file(dir),
                None,
                None,
                err.to_string(),
            )],
        ),
    }
}

/// The parsed contents of a manifest directory, file by file, and which definition of each
/// object is in force (the first by file path and document order).
#[derive(Clone, Debug, Default)]
pub struct ManifestSet {
    /// Paths and object references are shared (Arc) between this map, `definitions` and the
    /// parsed objects: at 10k Services their copies were a good part of the agent's memory.
    files: BTreeMap<Arc<Path>, ParsedFile>,
    /// Where each object is defined: (file, index among the file's objects), in order. A sorted
    /// Vec, not a BTreeSet: almost every object has one definition, and a B-tree leaf per object
    /// cost more than all the rest of this map at 10k Services.
    definitions: HashMap<Arc<ObjectRef>, Vec<(Arc<Path>, usize)>>,
    /// Objects whose definitions changed since the last [`ManifestSet::feed`].
    touched: BTreeSet<Arc<ObjectRef>>,
    /// The diagnostics may have changed since the last [`ManifestSet::feed`].
    diagnostics_dirty: bool,
    /// The slices each Endpoints object was last fed as, to take them back when it changes.
    mirrors_fed: HashMap<Arc<ObjectRef>, Vec<ObjectKey>>,
}

/// One manifest file as read: its objects and problems, or that it is gone.
#[derive(Debug)]
pub struct FileRead(Option<ParsedFile>);

impl FileRead {
    /// The file is no longer there.
    pub fn gone() -> Self {
        FileRead(None)
    }

    /// Reading it failed in a way that says nothing about the file (its reader panicked).
    pub fn failed(path: &Path, why: &str) -> Self {
        FileRead(Some(file_problem(
            path,
            format!("reading the file failed ({why}); it is read again when it changes"),
        )))
    }
}

#[derive(Clone, Debug, Default)]
struct ParsedFile {
    objects: Vec<ParsedObject>,
    diagnostics: Vec<Diagnostic>,
    /// When the file was last written: its Services' age (see [`Seniority`]).
    modified: Option<SystemTime>,
}

impl ParsedFile {
    fn seniority(&self) -> Seniority {
        Seniority {
            since: self.modified,
            uid: None,
        }
    }
}

/// One object of a file. Its origin is kept without the file's path, which the file's entry
/// has: 10k copies of the path were a good part of the parsed manifests.
#[derive(Clone, Debug)]
struct ParsedObject {
    line: Option<usize>,
    document: Option<usize>,
    reference: Arc<ObjectRef>,
    object: KnownObject,
}

impl ParsedObject {
    fn new(origin: Origin, reference: ObjectRef, object: KnownObject) -> Self {
        let (line, document) = match origin {
            Origin::Manifest { line, document, .. } => (line, document),
            Origin::Cluster => (None, None),
        };
        ParsedObject {
            line,
            document,
            reference: Arc::new(reference),
            object,
        }
    }

    /// Where the object is, `file` being the path of the file it was read from.
    fn origin(&self, file: &Arc<Path>) -> Origin {
        Origin::Manifest {
            file: file.clone(),
            line: self.line,
            document: self.document,
        }
    }

    fn site(&self, file: &Arc<Path>) -> Site {
        Site::new(self.origin(file), (*self.reference).clone())
    }

    /// For Endpoints: the EndpointSlices it mirrors to (by name).
    fn mirrors(&self) -> &[(String, Arc<SliceObject>)] {
        match &self.object {
            KnownObject::Endpoints(mirrored) => &mirrored.slices,
            _ => &[],
        }
    }

    /// For Endpoints: the problems mirroring found.
    fn mirror_diagnostics(&self) -> &[Diagnostic] {
        match &self.object {
            KnownObject::Endpoints(mirrored) => &mirrored.diagnostics,
            _ => &[],
        }
    }
}

#[derive(Clone, Debug)]
enum KnownObject {
    Service(Arc<ServiceObject>),
    EndpointSlice(Arc<SliceObject>),
    /// Only its mirrors are used. Boxed: Services and slices, the many, have none.
    Endpoints(Box<Mirrored>),
}

#[derive(Clone, Debug)]
struct Mirrored {
    slices: Vec<(String, Arc<SliceObject>)>,
    diagnostics: Vec<Diagnostic>,
}

/// Files parsed per thread when reading a whole directory: parsing dominates a cold start.
const PARSE_THREADS: usize = 2;

/// What one file may cost to parse is bounded by these, each named in the error that refuses a
/// file or document: the largest file parses in about a second, a document's parse tree stays
/// under about 100 MB, and no nesting makes the YAML parser slow (its time grows with the square
/// of the nesting depth). Kubernetes objects need a fraction of each.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
pub const MAX_DOCUMENTS: usize = 5_000;
pub const MAX_NESTING: usize = 64;

impl ManifestSet {
    pub fn read_dir(dir: &Path) -> Result<Self, ManifestError> {
        let read_err = |source| ManifestError::ReadDir {
            dir: dir.to_owned(),
            source,
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            // A symlink loop is read too, to be reported rather than skipped unnoticed.
            if Self::is_manifest_path(&path) && (path.is_file() || is_symlink_loop(&path)) {
                paths.push(path);
            }
        }
        let chunk = paths.len().div_ceil(PARSE_THREADS).max(1);
        let parsed: Vec<(PathBuf, Option<ParsedFile>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = paths
                .chunks(chunk)
                .map(|paths| {
                    scope.spawn(move || {
                        paths
                            .iter()
                            .map(|p| (p.clone(), read_file(p)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        let mut set = ManifestSet::default();
        for (path, file) in parsed {
            set.set_file(&path, file);
        }
        Ok(set)
    }

    /// Whether a watcher should care about `path`: `*.yaml`, `*.yml` or `*.json`, not hidden.
    /// Editor droppings (`.x.swp`, `x.yaml~`, `#x.yaml#`, `.#x.yaml`) fail one test or the other.
    pub fn is_manifest_path(path: &Path) -> bool {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        if name.starts_with('.') {
            return false;
        }
        matches!(
            path.extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("yaml" | "yml" | "json")
        )
    }

    /// Re-reads one file. A file that no longer exists is removed. Returns false if `path` is not
    /// a manifest file name (nothing changed).
    pub fn update_file(&mut self, path: &Path) -> bool {
        if !Self::is_manifest_path(path) {
            return false;
        }
        let file = read_file(path);
        self.set_file(path, file);
        true
    }

    /// Reads and parses `path`, the slow part of a change, without the set: the agent does it on
    /// another thread ([`ParseQueue`]) and hands the result to [`ManifestSet::apply_read`].
    pub fn read_path(path: &Path) -> FileRead {
        FileRead(read_file(path))
    }

    /// Takes in what [`ManifestSet::read_path`] read (a file no longer there is removed).
    pub fn apply_read(&mut self, path: &Path, read: FileRead) {
        self.set_file(path, read.0);
    }

    /// Parses `text` as the contents of `path` (no file system access).
    pub fn update_file_text(&mut self, path: &Path, text: &str) {
        self.set_file(path, Some(parse_file(path, text)));
    }

    pub fn remove_file(&mut self, path: &Path) -> bool {
        let present = self.files.contains_key(path);
        self.set_file(path, None);
        present
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.keys().map(|p| &**p)
    }

    /// Replaces (Some) or forgets (None) what `path` defines.
    fn set_file(&mut self, path: &Path, file: Option<ParsedFile>) {
        if let Some((old_path, old)) = self.files.remove_entry(path) {
            self.note_file(&old_path, &old, false);
        }
        if let Some(new) = file {
            let path: Arc<Path> = Arc::from(path);
            self.note_file(&path, &new, true);
            self.files.insert(path, new);
        }
    }

    /// Adds or removes the definitions of `file`, noting what they touch.
    fn note_file(&mut self, path: &Arc<Path>, file: &ParsedFile, add: bool) {
        self.diagnostics_dirty |= !file.diagnostics.is_empty();
        for (i, parsed) in file.objects.iter().enumerate() {
            let reference = &parsed.reference;
            let definitions = self
                .definitions
                .entry(reference.clone())
                .or_insert_with(|| Vec::with_capacity(1));
            // With more than one definition, "defined twice" comes or goes.
            let others = definitions.len() - usize::from(!add);
            self.diagnostics_dirty |= others > 0 || !parsed.mirror_diagnostics().is_empty();
            let at = definitions.binary_search_by(|(p, at)| (&**p, *at).cmp(&(&**path, i)));
            if add {
                if let Err(at) = at {
                    definitions.insert(at, (path.clone(), i));
                }
            } else {
                if let Ok(at) = at {
                    definitions.remove(at);
                }
                if definitions.is_empty() {
                    self.definitions.remove(&**reference);
                }
            }
            self.touched.insert(reference.clone());
        }
    }

    /// The definition in force of `reference`.
    fn winner(&self, reference: &ObjectRef) -> Option<(&Arc<Path>, &ParsedObject)> {
        let (path, i) = self.definitions.get(reference)?.first()?;
        Some((path, self.files.get(&**path)?.objects.get(*i)?))
    }

    /// How old the objects of `path` are.
    fn seniority(&self, path: &Path) -> Seniority {
        self.files
            .get(path)
            .map(ParsedFile::seniority)
            .unwrap_or_default()
    }

    /// Hands `translator` every object whose definition in force changed since the last call,
    /// and the diagnostics if they may have changed.
    pub fn feed(&mut self, translator: &mut Incremental) {
        for reference in std::mem::take(&mut self.touched) {
            let winner = self.winner(&reference);
            let key = ObjectKey {
                namespace: reference.namespace.clone(),
                name: reference.name.clone(),
            };
            let origin = || winner.map(|(path, w)| w.origin(path));
            match (&*reference.kind, winner.map(|(_, w)| &w.object)) {
                ("Service", Some(KnownObject::Service(service))) => {
                    let source = winner.map(|(path, w)| {
                        Sourced::new(service.clone(), w.origin(path))
                            .with_seniority(self.seniority(path))
                    });
                    translator.set_service(key, source);
                }
                ("Service", _) => translator.set_service(key, None),
                ("EndpointSlice", Some(KnownObject::EndpointSlice(slice))) => {
                    translator.set_slice(key, origin().map(|o| Sourced::new(slice.clone(), o)));
                }
                ("EndpointSlice", _) => translator.set_slice(key, None),
                _ => {
                    let previous = self.mirrors_fed.get(&reference).cloned();
                    for old in previous.unwrap_or_default() {
                        translator.set_slice(old, None);
                    }
                    let Some((path, winner)) = winner else {
                        self.mirrors_fed.remove(&reference);
                        continue;
                    };
                    let mut fed = Vec::new();
                    for (name, slice) in winner.mirrors() {
                        let key = ObjectKey::new(&reference.namespace, name);
                        translator.set_slice(
                            key.clone(),
                            Some(Sourced {
                                object: slice.clone(),
                                origin: winner.origin(path),
                                mirrored_from: Some(reference.clone()),
                                seniority: Seniority::default(),
                            }),
                        );
                        fed.push(key);
                    }
                    self.mirrors_fed.insert(reference, fed);
                }
            }
        }
        if std::mem::take(&mut self.diagnostics_dirty) {
            translator.set_source_diagnostics(self.diagnostics());
        }
    }

    /// Services and EndpointSlices (legacy Endpoints mirrored to slices) of all files, with every
    /// diagnostic: the files' own, then duplicates and mirroring problems.
    pub fn inventory(&self) -> (Inventory, Vec<Diagnostic>) {
        let mut inventory = Inventory::default();
        for reference in self.definitions.keys() {
            let Some((path, winner)) = self.winner(reference) else {
                continue;
            };
            let key = ObjectKey {
                namespace: reference.namespace.clone(),
                name: reference.name.clone(),
            };
            let origin = winner.origin(path);
            match &winner.object {
                KnownObject::Service(service) => {
                    let source =
                        Sourced::new(service.clone(), origin).with_seniority(self.seniority(path));
                    inventory.services.insert(key, source);
                }
                KnownObject::EndpointSlice(slice) => {
                    inventory
                        .slices
                        .insert(key, Sourced::new(slice.clone(), origin));
                }
                KnownObject::Endpoints(_) => {
                    for (name, slice) in winner.mirrors() {
                        inventory.slices.insert(
                            ObjectKey::new(&reference.namespace, name),
                            Sourced {
                                object: slice.clone(),
                                origin: origin.clone(),
                                mirrored_from: Some(reference.clone()),
                                seniority: Seniority::default(),
                            },
                        );
                    }
                }
            }
        }
        (inventory, self.diagnostics())
    }

    /// Every diagnostic of the files: their own, then duplicates and mirroring problems, by place.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut diagnostics: Vec<Diagnostic> = Vec::new();
        for file in self.files.values() {
            diagnostics.extend(file.diagnostics.iter().cloned());
        }
        for (path, file) in &self.files {
            for (i, parsed) in file.objects.iter().enumerate() {
                let first = self
                    .definitions
                    .get(&parsed.reference)
                    .and_then(|d| d.first())
                    .filter(|(p, at)| (p, *at) != (path, i))
                    .and_then(|(p, at)| Some((p, self.files.get(&**p)?.objects.get(*at)?)));
                match first {
                    Some((first_path, first)) => diagnostics.push(parsed.site(path).diagnostic(
                        Severity::Error,
                        None,
                        format!(
                            "defined twice: this definition is ignored, the first one ({}) is used",
                            first.origin(first_path)
                        ),
                    )),
                    None => diagnostics.extend(parsed.mirror_diagnostics().iter().cloned()),
                }
            }
        }
        // By place, so a file's problems read top to bottom.
        diagnostics.sort_by(|a, b| a.origin.cmp(&b.origin));
        diagnostics
    }
}

/// The kinds parsed into objects, as static strings: every parsed object names its kind.
fn static_kind(kind: &str) -> Cow<'static, str> {
    match kind {
        "Service" => Cow::Borrowed("Service"),
        "EndpointSlice" => Cow::Borrowed("EndpointSlice"),
        "Endpoints" => Cow::Borrowed("Endpoints"),
        other => Cow::Owned(other.to_owned()),
    }
}

/// Reads and parses one file; None if it does not exist (any more).
fn read_file(path: &Path) -> Option<ParsedFile> {
    match read_limited(path) {
        Ok(Ok((text, modified))) => Some(ParsedFile {
            modified,
            ..parse_file(path, &text)
        }),
        Ok(Err(size)) => Some(file_problem(path, too_big(size))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => Some(file_problem(
            path,
            format!(
                "a symbolic link that leads back to itself ({}); file ignored",
                link_chain(path)
            ),
        )),
        Err(err) => Some(file_problem(path, format!("cannot read file: {err}"))),
    }
}

/// Whether `path` is a symbolic link that cannot be followed because it leads back to itself.
pub fn is_symlink_loop(path: &Path) -> bool {
    std::fs::metadata(path).is_err_and(|err| err.raw_os_error() == Some(libc::ELOOP))
}

/// `a.yaml -> b.yaml -> a.yaml`: the links followed from `path` until one comes back.
fn link_chain(path: &Path) -> String {
    let mut names = vec![path.display().to_string()];
    let mut visited = vec![path.to_path_buf()];
    while let Ok(target) = std::fs::read_link(&visited[visited.len() - 1]) {
        names.push(target.display().to_string());
        let next = match visited[visited.len() - 1].parent() {
            Some(dir) if target.is_relative() => dir.join(&target),
            _ => target,
        };
        if visited.contains(&next) || visited.len() > 8 {
            break;
        }
        visited.push(next);
    }
    names.join(" -> ")
}

/// The file's text, or its size without reading it when that is more than [`MAX_FILE_BYTES`]
/// (a file growing meanwhile is cut short there, and refused by [`parse_file`]).
fn read_limited(path: &Path) -> io::Result<Result<(String, Option<SystemTime>), u64>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.len() > MAX_FILE_BYTES {
        return Ok(Err(meta.len()));
    }
    let mut text = String::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    Ok(Ok((text, meta.modified().ok())))
}

fn too_big(size: u64) -> String {
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    format!(
        "the file is {:.1} MiB, more than the {} MiB extproxy reads of one manifest file; file ignored (split it into several files)",
        mib(size),
        MAX_FILE_BYTES >> 20
    )
}

/// A file that yields nothing but one problem with the whole file.
fn file_problem(path: &Path, message: String) -> ParsedFile {
    ParsedFile {
        modified: None,
        objects: Vec::new(),
        diagnostics: vec![Diagnostic::new(
            Severity::Error,
            Origin::file(path),
            None,
            None,
            message,
        )],
    }
}

// ---------------------------------------------------------------------------------------------
// Files and documents
// ---------------------------------------------------------------------------------------------

fn parse_file(path: &Path, text: &str) -> ParsedFile {
    if text.len() as u64 > MAX_FILE_BYTES {
        return file_problem(path, too_big(text.len() as u64));
    }
    // Editors on Windows start UTF-8 files with a byte order mark; neither parser skips it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parsed = parse_documents(path, text);
    // Kept until the file changes: without this, growth slack is a third of a small file's size.
    parsed.objects.shrink_to_fit();
    parsed.diagnostics.shrink_to_fit();
    parsed
}

fn parse_documents(path: &Path, text: &str) -> ParsedFile {
    let mut parsed = ParsedFile::default();
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        // One JSON value per file; serde_json's errors carry absolute lines already.
        match serde_json::from_str::<&RawValue>(text) {
            Ok(raw) => {
                let line = first_content_line(text).unwrap_or(1);
                let origin = Origin::document(path, line, 0);
                parse_object(Doc::Raw(raw), &origin, "", None, &mut parsed);
            }
            Err(err) => parsed.diagnostics.push(Diagnostic::new(
                Severity::Error,
                Origin::document(path, err.line().max(1), 0),
                None,
                None,
                format!(
                    "invalid JSON: {} (column {}); file ignored",
                    strip_position(&err.to_string()),
                    err.column()
                ),
            )),
        }
        return parsed;
    }
    for document in split_documents(text, MAX_DOCUMENTS + 1) {
        let origin = Origin::document(path, document.content_line, document.index);
        let refuse =
            |message: String| Diagnostic::new(Severity::Error, origin.clone(), None, None, message);
        if document.index == MAX_DOCUMENTS {
            parsed.diagnostics.push(refuse(format!(
                "more than {MAX_DOCUMENTS} documents, the most extproxy reads of one file; this one and the rest of the file are ignored (split it into several files)"
            )));
            break;
        }
        if document.text.len() > MAX_DOCUMENT_BYTES {
            parsed.diagnostics.push(refuse(format!(
                "the document is {} KiB, more than the {} KiB extproxy reads of one YAML document; document ignored (split a long list into several documents)",
                document.text.len() >> 10,
                MAX_DOCUMENT_BYTES >> 10
            )));
            continue;
        }
        if let Some(line) = nesting::too_deep(&document.text, MAX_NESTING) {
            parsed.diagnostics.push(Diagnostic::new(
                Severity::Error,
                Origin::document(path, document.first_line + line - 1, document.index),
                None,
                None,
                format!(
                    "nested more than {MAX_NESTING} levels deep, the most extproxy reads (Kubernetes objects need far fewer); document ignored"
                ),
            ));
            continue;
        }
        let yaml = match serde_yaml::from_str::<serde_yaml::Value>(&document.text) {
            Ok(yaml) => yaml,
            Err(err) => {
                let (line, column) = match err.location() {
                    Some(loc) => (document.first_line + loc.line() - 1, Some(loc.column())),
                    None => (document.content_line, None),
                };
                let mut message = format!("invalid YAML: {}", strip_position(&err.to_string()));
                if let Some(column) = column {
                    message.push_str(&format!(" (column {column})"));
                }
                message.push_str("; document ignored");
                parsed.diagnostics.push(Diagnostic::new(
                    Severity::Error,
                    Origin::document(path, line, document.index),
                    None,
                    None,
                    message,
                ));
                continue;
            }
        };
        match yaml_to_json(yaml) {
            Ok(Value::Null) => {}
            Ok(value) => parse_object(Doc::Value(&value), &origin, "", None, &mut parsed),
            Err(message) => parsed.diagnostics.push(Diagnostic::new(
                Severity::Error,
                origin,
                None,
                None,
                message,
            )),
        }
    }
    parsed
}

struct Document {
    text: String,
    /// 1-based line of the document's first line (right after the separator).
    first_line: usize,
    /// 1-based line of its first line that is neither blank nor a comment.
    content_line: usize,
    /// Index among the file's non-empty documents.
    index: usize,
}

fn push_document(chunk: &mut Vec<&str>, first_line: usize, documents: &mut Vec<Document>) {
    let joined = chunk.join("\n");
    if let Some(offset) = first_content_line(&joined) {
        let index = documents.len();
        documents.push(Document {
            text: joined,
            first_line,
            content_line: first_line + offset - 1,
            index,
        });
    }
    chunk.clear();
}

/// Splits on `---` lines ourselves, instead of letting the YAML parser do it, so one broken
/// document cannot stop the parsing of the next ones. Stops after `at_most` documents.
fn split_documents(text: &str, at_most: usize) -> Vec<Document> {
    let mut documents = Vec::new();
    let mut chunk: Vec<&str> = Vec::new();
    let mut chunk_first_line = 1;
    for (i, line) in text.lines().enumerate() {
        if documents.len() == at_most {
            return documents;
        }
        if is_document_separator(line) {
            push_document(&mut chunk, chunk_first_line, &mut documents);
            chunk_first_line = i + 2;
        } else {
            chunk.push(line);
        }
    }
    push_document(&mut chunk, chunk_first_line, &mut documents);
    documents
}

fn is_document_separator(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("---") else {
        return false;
    };
    let rest_trimmed = rest.trim_start();
    rest.is_empty()
        || (rest.len() != rest_trimmed.len()
            && (rest_trimmed.is_empty() || rest_trimmed.starts_with('#')))
}

/// 1-based line of the first line that is not blank, not a comment and not a `...` end marker.
fn first_content_line(text: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#') && t != "..."
        })
        .map(|i| i + 1)
}

/// Parser messages end in " at line L column C" relative to the document; the diagnostic gives
/// the absolute line instead, so the relative one would only mislead.
fn strip_position(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(" at ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 4..];
        let skip = position_len(after);
        if skip == 0 {
            out.push_str(" at ");
            rest = after;
        } else {
            rest = &after[skip..];
        }
    }
    out.push_str(rest);
    out
}

/// Length of a leading "line N column M" or "position N", else 0.
fn position_len(s: &str) -> usize {
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    if let Some(r) = s.strip_prefix("line ") {
        let n = digits(r);
        if n > 0
            && let Some(c) = r[n..].strip_prefix(" column ")
        {
            let m = digits(c);
            if m > 0 {
                return "line ".len() + n + " column ".len() + m;
            }
        }
    } else if let Some(r) = s.strip_prefix("position ") {
        let n = digits(r);
        if n > 0 {
            return "position ".len() + n;
        }
    }
    0
}

fn yaml_to_json(mut yaml: serde_yaml::Value) -> Result<Value, String> {
    yaml.apply_merge()
        .map_err(|e| format!("invalid YAML merge key: {}", strip_position(&e.to_string())))?;
    serde_json::to_value(&yaml).map_err(|e| format!("cannot be read as a Kubernetes object: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

fn join_field(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}.{field}"),
    }
}

/// One object's text: a JSON value already built (YAML documents), or the raw text of a JSON
/// one, read straight into the compact types without building a tree of it first.
#[derive(Clone, Copy)]
enum Doc<'a> {
    Value(&'a Value),
    Raw(&'a RawValue),
}

/// What an object says of itself before its type is chosen.
#[derive(Default)]
struct Header<'a> {
    is_object: bool,
    /// The `kind` key is there (whatever its value).
    has_kind: bool,
    kind: Option<String>,
    api_version: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    /// None when there is no `items` key.
    items: Option<Items<'a>>,
}

enum Items<'a> {
    List(Vec<Doc<'a>>),
    Null,
    Other,
}

impl<'a> Doc<'a> {
    fn header(self) -> Header<'a> {
        match self {
            Doc::Value(value) => {
                let Value::Object(map) = value else {
                    return Header::default();
                };
                let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
                let metadata = map.get("metadata");
                Header {
                    is_object: true,
                    has_kind: map.contains_key("kind"),
                    kind: text(map.get("kind")),
                    api_version: text(map.get("apiVersion")),
                    name: text(metadata.and_then(|m| m.get("name"))),
                    namespace: text(metadata.and_then(|m| m.get("namespace"))),
                    items: map.get("items").map(|items| match items {
                        Value::Array(items) => Items::List(items.iter().map(Doc::Value).collect()),
                        Value::Null => Items::Null,
                        _ => Items::Other,
                    }),
                }
            }
            // The text is valid JSON already: only its shape can fail to be an object's.
            Doc::Raw(raw) if raw.get().starts_with('{') => {
                serde_json::from_str::<RawHeader<'a>>(raw.get())
                    .map(|h| h.0)
                    .unwrap_or_default()
            }
            Doc::Raw(_) => Header::default(),
        }
    }

    /// Deserializes the object, naming the field a type error is in.
    fn deserialize<T: DeserializeOwned>(self) -> Result<T, (String, String)> {
        // Without tracking the path first: tracking copies every key, and errors are rare.
        let fast = match self {
            Doc::Value(value) => T::deserialize(value).ok(),
            Doc::Raw(raw) => {
                T::deserialize(&mut serde_json::Deserializer::from_str(raw.get())).ok()
            }
        };
        if let Some(object) = fast {
            return Ok(object);
        }
        let field = |path: &serde_path_to_error::Path| {
            let path = path.to_string();
            if path == "." { String::new() } else { path }
        };
        match self {
            Doc::Value(value) => serde_path_to_error::deserialize(value)
                .map_err(|err| (field(err.path()), err.into_inner().to_string())),
            Doc::Raw(raw) => {
                serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(raw.get()))
                    .map_err(|err| {
                        let path = field(err.path());
                        let inner = err.into_inner();
                        // Positions within the object's own text would only mislead: the diagnostic
                        // gives the document's line.
                        let message = inner.to_string();
                        let suffix = format!(" at line {} column {}", inner.line(), inner.column());
                        let message = match message.strip_suffix(&suffix) {
                            Some(m) => m.to_owned(),
                            None => message,
                        };
                        (path, message)
                    })
            }
        }
    }
}

/// [`Header`] read from raw JSON text: `kind`, `apiVersion`, `metadata.name`,
/// `metadata.namespace` and `items` as a JSON value's accessors see them (a later duplicate key
/// wins, a value of another type reads as absent); everything else skipped unread.
struct RawHeader<'a>(Header<'a>);

impl<'de> serde::Deserialize<'de> for RawHeader<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RawHeader<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut header = Header {
                    is_object: true,
                    ..Header::default()
                };
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "kind" => {
                            header.has_kind = true;
                            header.kind = raw_str(map.next_value()?);
                        }
                        "apiVersion" => header.api_version = raw_str(map.next_value()?),
                        "metadata" => {
                            let raw: &RawValue = map.next_value()?;
                            (header.name, header.namespace) = if raw.get().starts_with('{') {
                                serde_json::from_str::<RawMeta>(raw.get())
                                    .map(|m| (m.name, m.namespace))
                                    .unwrap_or_default()
                            } else {
                                (None, None)
                            };
                        }
                        "items" => {
                            let raw: &'de RawValue = map.next_value()?;
                            header.items = Some(match raw.get() {
                                "null" => Items::Null,
                                text if text.starts_with('[') => {
                                    match serde_json::from_str::<Vec<&'de RawValue>>(text) {
                                        Ok(items) => {
                                            Items::List(items.into_iter().map(Doc::Raw).collect())
                                        }
                                        Err(_) => Items::Other,
                                    }
                                }
                                _ => Items::Other,
                            });
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(RawHeader(header))
            }
        }
        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// `metadata.name` and `metadata.namespace` of raw JSON, when they are strings.
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
}

impl<'de> serde::Deserialize<'de> for RawMeta {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MetaVisitor;
        impl<'de> Visitor<'de> for MetaVisitor {
            type Value = RawMeta;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMeta, A::Error> {
                let mut meta = RawMeta {
                    name: None,
                    namespace: None,
                };
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "name" => meta.name = raw_str(map.next_value()?),
                        "namespace" => meta.namespace = raw_str(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(meta)
            }
        }
        deserializer.deserialize_map(MetaVisitor)
    }
}

/// A raw JSON value as a string, if it is one.
fn raw_str(raw: &RawValue) -> Option<String> {
    raw.get()
        .starts_with('"')
        .then(|| serde_json::from_str(raw.get()).ok())
        .flatten()
}

/// Handles one object (or a `List` of them). `prefix` is the field path of the object within
/// its document (`items[3]` inside a List); `inherited` the kind and apiVersion a `ServiceList`
/// style list gives items that name no kind.
fn parse_object(
    doc: Doc<'_>,
    origin: &Origin,
    prefix: &str,
    inherited: Option<(&str, Option<&str>)>,
    out: &mut ParsedFile,
) {
    let problem = |field: &str, message: String| {
        let field = join_field(prefix, field);
        Diagnostic::new(
            Severity::Error,
            origin.clone(),
            None,
            (!field.is_empty()).then_some(field),
            message,
        )
    };
    let header = doc.header();
    if !header.is_object {
        out.diagnostics.push(problem(
            "",
            "not a Kubernetes object: expected a mapping with apiVersion, kind and metadata".into(),
        ));
        return;
    }
    let (kind, api_version) = match inherited {
        Some((kind, version)) if !header.has_kind => (
            Some(kind.to_owned()),
            version.map(str::to_owned).or(header.api_version),
        ),
        _ => (header.kind, header.api_version),
    };
    let Some(kind) = kind else {
        out.diagnostics.push(problem(
            "kind",
            "kind is missing: every object needs a kind (Service, EndpointSlice or Endpoints)"
                .into(),
        ));
        return;
    };
    let name = header.name.unwrap_or_default();
    let namespace = header.namespace;

    // `List` (kubectl) or `ServiceList`-style (API responses, whose items carry no kind).
    let item_kind = kind.strip_suffix("List");
    let expected_api_version = match kind.as_str() {
        _ if kind == "List" || (item_kind.is_some() && header.items.is_some()) => {
            match header.items {
                Some(Items::List(items)) => {
                    let inherit = item_kind
                        .filter(|k| !k.is_empty())
                        .map(|k| (k, api_version.as_deref()));
                    for (i, item) in items.into_iter().enumerate() {
                        parse_object(
                            item,
                            origin,
                            &join_field(prefix, &format!("items[{i}]")),
                            inherit,
                            out,
                        );
                    }
                }
                Some(Items::Null) | None => {}
                Some(Items::Other) => out
                    .diagnostics
                    .push(problem("items", "items must be a list of objects".into())),
            }
            return;
        }
        "Service" | "Endpoints" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => {
            // Nothing of it is validated: what is said of it is kept short.
            let kind = shorten(&kind);
            let reference = ObjectRef::new(
                kind.clone(),
                shorten(namespace.as_deref().unwrap_or_default()),
                shorten(&name),
            );
            out.diagnostics.push(Diagnostic::new(
                Severity::Info,
                origin.clone(),
                Some(reference),
                (!prefix.is_empty()).then(|| prefix.to_owned()),
                format!("kind {kind} is not used by extproxy; ignored"),
            ));
            return;
        }
    };
    let namespace = namespace.unwrap_or_else(|| "default".to_owned());
    let site = Site::new(
        origin.clone(),
        ObjectRef::new(static_kind(&kind), namespace, name),
    );
    let field_error = |field: &str, message: String| {
        site.diagnostic(Severity::Error, Some(&join_field(prefix, field)), message)
    };
    match api_version.as_deref() {
        Some(v) if v == expected_api_version => {}
        Some(v) => {
            out.diagnostics.push(field_error(
                "apiVersion",
                format!("apiVersion {v} is not supported for kind {kind}: use apiVersion {expected_api_version}; object ignored"),
            ));
            return;
        }
        None => {
            out.diagnostics.push(field_error(
                "apiVersion",
                format!(
                    "apiVersion is missing: add apiVersion: {expected_api_version}; object ignored"
                ),
            ));
            return;
        }
    }
    if site.object.name.is_empty() {
        out.diagnostics.push(field_error(
            "metadata.name",
            "metadata.name is missing: every object needs a name; object ignored".into(),
        ));
        return;
    }
    if let Some((field, problem)) = invalid_name(&kind, &site.object) {
        // Said with the names cut short: a name of 100,000 characters was repeated in every
        // line about the object.
        let short = ObjectRef::new(
            site.object.kind.clone(),
            shorten(&site.object.namespace),
            shorten(&site.object.name),
        );
        out.diagnostics.push(Diagnostic::new(
            Severity::Error,
            site.origin.clone(),
            Some(short),
            Some(join_field(prefix, field)),
            format!("{problem} (the API server refuses it too); object ignored"),
        ));
        return;
    }
    let object = match kind.as_str() {
        "Service" => doc.deserialize::<ServiceObject>().map(|mut s| {
            s.shrink_to_fit();
            KnownObject::Service(Arc::new(s))
        }),
        "EndpointSlice" => doc.deserialize::<SliceObject>().and_then(|mut s| {
            if let Some(service) = s.metadata.labels.get(SERVICE_NAME_LABEL)
                && !is_dns_label(service, true)
            {
                return Err((
                    format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                    format!(
                        "{:?} cannot be the name of a Service (at most 63 characters, lower case letters, digits and '-', starting with a letter and ending with a letter or digit)",
                        shorten(service)
                    ),
                ));
            }
            s.shrink_to_fit();
            Ok(KnownObject::EndpointSlice(Arc::new(s)))
        }),
        _ => doc.deserialize::<EndpointsObject>().map(|endpoints| {
            let mut diagnostics = Vec::new();
            let slices = mirror_endpoints(&endpoints, &site, &mut diagnostics)
                .into_iter()
                .map(|(name, mut slice)| {
                    slice.shrink_to_fit();
                    (name, Arc::new(slice))
                })
                .collect();
            KnownObject::Endpoints(Box::new(Mirrored {
                slices,
                diagnostics,
            }))
        }),
    };
    match object {
        Ok(object) => out
            .objects
            .push(ParsedObject::new(site.origin, site.object, object)),
        Err((field, message)) => out
            .diagnostics
            .push(field_error(&field, format!("{message}; object ignored"))),
    }
}

/// Names longer than this are cut short where a message repeats them.
const SHORT_NAME: usize = 63;

/// `text`, or its beginning and its length when it is longer than names may be.
fn shorten(text: &str) -> String {
    let chars = text.chars().count();
    if chars <= SHORT_NAME {
        return text.to_owned();
    }
    let start: String = text.chars().take(SHORT_NAME - 20).collect();
    format!("{start}...({chars} characters)")
}

/// A DNS label (RFC 1123): 1-63 lower case letters, digits and '-', starting and ending with a
/// letter or digit; `letter_first` (RFC 1035) also wants a letter first.
fn is_dns_label(text: &str, letter_first: bool) -> bool {
    let bytes = text.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && *first != b'-'
        && *last != b'-'
        && (!letter_first || first.is_ascii_lowercase())
}

/// A DNS subdomain (RFC 1123): at most 253 characters, DNS labels joined by '.'.
fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(|label| is_dns_label(label, false))
}

/// The field and the problem, when the object's namespace or name is one the API server
/// refuses: a Service's name is an RFC 1035 label, an EndpointSlice's or Endpoints' an RFC
/// 1123 subdomain, a namespace an RFC 1123 label. A slice's `kubernetes.io/service-name` label
/// must be able to name a Service.
fn invalid_name(kind: &str, object: &ObjectRef) -> Option<(&'static str, String)> {
    if !is_dns_label(&object.namespace, false) {
        let chars = object.namespace.chars().count();
        let long = if chars > 63 {
            format!(", not {chars}")
        } else {
            String::new()
        };
        return Some((
            "metadata.namespace",
            format!(
                "{:?} is not a valid namespace: at most 63 characters{long}, lower case letters, digits and '-', starting and ending with a letter or digit",
                shorten(&object.namespace)
            ),
        ));
    }
    let name = &*object.name;
    let (valid, limit, rule) = match kind {
        "Service" => (
            is_dns_label(name, true),
            63,
            "lower case letters, digits and '-', starting with a letter and ending with a letter or digit",
        ),
        _ => (
            is_dns_subdomain(name),
            253,
            "lower case letters, digits, '-' and '.', each part between dots starting and ending with a letter or digit",
        ),
    };
    if valid {
        return None;
    }
    let chars = name.chars().count();
    let long = if chars > limit {
        format!(", not {chars}")
    } else {
        String::new()
    };
    Some((
        "metadata.name",
        format!(
            "{:?} is not a valid {kind} name: at most {limit} characters{long}, {rule}",
            shorten(name)
        ),
    ))
}

// ---------------------------------------------------------------------------------------------
// Endpoints -> EndpointSlice mirroring
// ---------------------------------------------------------------------------------------------

/// Converts legacy Endpoints the way the endpointslicemirroring controller does: one slice per
/// (set of ports, address family), addresses ready, notReadyAddresses not ready. Subsets with the
/// same ports share slices. Invalid addresses and ports are reported and skipped. Returns each
/// slice with its name.
fn mirror_endpoints(
    endpoints: &EndpointsObject,
    site: &Site,
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<(String, SliceObject)> {
    let name = &site.object.name;
    if endpoints.metadata.labels.get(SKIP_MIRROR_LABEL) == Some("true") {
        diagnostics.push(site.info(
            &format!("metadata.labels[{SKIP_MIRROR_LABEL}]"),
            "not mirrored to an EndpointSlice (skip-mirror is true), so extproxy does not use these endpoints",
        ));
        return Vec::new();
    }

    // (ports, IPv4 endpoints, IPv6 endpoints), in order of first appearance.
    type Group = (Vec<SlicePort>, Vec<EndpointObject>, Vec<EndpointObject>);
    let mut groups: Vec<Group> = Vec::new();
    for (s, subset) in endpoints.subsets.iter().flatten().enumerate() {
        let mut ports: Vec<SlicePort> = Vec::new();
        for (p, port) in subset.ports.iter().flatten().enumerate() {
            if !(1..=65535).contains(&port.port) {
                diagnostics.push(site.error(
                    &format!("subsets[{s}].ports[{p}].port"),
                    format!("port {} is out of range 1-65535; port ignored", port.port),
                ));
                continue;
            }
            ports.push(SlicePort {
                name: Some(port.name.clone().unwrap_or_default()),
                port: Some(port.port),
                protocol: Some(port.protocol.clone().unwrap_or_else(|| "TCP".to_owned())),
                app_protocol: port.app_protocol.clone(),
            });
        }
        ports.sort_by(|a, b| (&a.name, &a.protocol, a.port).cmp(&(&b.name, &b.protocol, b.port)));
        let group = match groups.iter().position(|(p, _, _)| *p == ports) {
            Some(i) => i,
            None => {
                groups.push((ports, Vec::new(), Vec::new()));
                groups.len() - 1
            }
        };
        let lists = [
            ("addresses", &subset.addresses, true),
            ("notReadyAddresses", &subset.not_ready_addresses, false),
        ];
        for (list_name, list, ready) in lists {
            for (a, address) in list.iter().flatten().enumerate() {
                let ip: IpAddr = match address.ip.parse() {
                    Ok(ip) => ip,
                    Err(_) => {
                        diagnostics.push(site.error(
                            &format!("subsets[{s}].{list_name}[{a}].ip"),
                            format!("{:?} is not an IP address; address ignored", address.ip),
                        ));
                        continue;
                    }
                };
                let endpoint = EndpointObject {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: None,
                        terminating: None,
                    }),
                };
                let (_, v4, v6) = &mut groups[group];
                if ip.is_ipv4() { v4 } else { v6 }.push(endpoint);
            }
        }
    }

    let mut slices = Vec::new();
    for (g, (ports, v4, v6)) in groups.into_iter().enumerate() {
        for (family, endpoints) in [("IPv4", v4), ("IPv6", v6)] {
            if endpoints.is_empty() {
                continue;
            }
            let mut labels = Kept::default();
            labels.insert(SERVICE_NAME_LABEL, name);
            labels.insert(MANAGED_BY_LABEL, MIRRORING_CONTROLLER);
            // '/' cannot appear in a real object name, so this never collides with a slice from
            // the manifests.
            let slice_name = format!("{name}/mirror-{g}-{}", family.to_ascii_lowercase());
            slices.push((
                slice_name,
                SliceObject {
                    metadata: Meta {
                        labels,
                        ..Meta::default()
                    },
                    address_type: family.to_owned(),
                    endpoints,
                    ports: Some(ports.clone()),
                },
            ));
        }
    }
    slices
}

mod nesting;
mod queue;
#[cfg(test)]
mod tests;

pub use queue::ParseQueue;
