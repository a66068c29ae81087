//! The module graph of every crate of the workspace (ARCHITECTURE.md, "Layers"), read
//! from the source, `#[cfg(test)]` modules included, so an import that would close a loop
//! or run upward fails here before it becomes a tangle.
//!
//! What is read: the root package's `src/` and each `crates/*/src/`. In every `.rs` file the
//! comments and string literals are dropped, then every `crate::…` and `super::…` path is
//! collected (groups `crate::{a, b::{c, d}}` expanded, `super` resolved from the file's
//! module and any inline `mod tests { … }` it sits in; `self::…` is ignored as it never
//! leaves the module). A file's module comes from its path (`lib.rs`/`main.rs` are the
//! crate root, `x/mod.rs` and `x.rs` are `x`), and a path is resolved to its longest
//! prefix that is a module of the crate: `crate::store::Install` names `store`.
//!
//! What is checked:
//! - **No circle anywhere.** An import from module A to module B (neither an ancestor of
//!   the other) is an edge between the children of their lowest common ancestor, one on
//!   each side: `crate::api::usage` → `crate::store::events` is `api -> store` at the crate
//!   root, `store::writer` → `store::health` is `writer -> health` at `store`. At every
//!   level no cycle of any length may form.
//! - **The crate root is the composition root.** `lib.rs`/`main.rs` may import every module,
//!   so no module may import the root's own items (`crate::serve`, `super::State` from a
//!   top-level module).
//! - **Layers.** For the crates with a table below, each top-level module may import only
//!   the modules its row names, and every top-level module has a row.
//! - **Crate boundaries.** Which code may name another crate of the workspace at all: in
//!   the agent only `cli` (the `demo` command) names `usage_receiver`, and no lower crate
//!   ever names `usage_agent`.
//!
//! To place a new crate in layers: write its table (top to bottom, each row naming only
//! rows below it), add it to `LAYERS`, and add a one-line test calling `follows_its_layers`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// What each top-level module of a crate may import, rows from the top layer down; a row
/// names only modules of rows below it (checked by
/// `every_layer_table_reads_from_top_to_bottom`).
type Table = &'static [(&'static str, &'static [&'static str])];

/// The agent (`src/`). Its leaves of old (`event`, `protocol`, `server`, `credentials`,
/// `gather_vfs`, `private_file`, `sqlite_check`, `toml_place`) and the receiver are crates
/// of their own now, reached as `usage_protocol::…`, `usage_common::…` and
/// `usage_receiver::…`, so they are no rows here.
const AGENT: Table = &[
    (
        "cli",
        &[
            "daemon", "api", "jobs", "state", "sync", "metrics", "quota", "store", "identity",
            "config", "calendar",
        ],
    ),
    (
        "daemon",
        &[
            "api", "jobs", "state", "sync", "metrics", "quota", "store", "identity", "config",
            "calendar",
        ],
    ),
    (
        "api",
        &[
            "jobs", "state", "sync", "metrics", "quota", "store", "identity", "config", "calendar",
        ],
    ),
    (
        "jobs",
        &[
            "state", "sync", "metrics", "quota", "store", "config", "calendar",
        ],
    ),
    (
        "state",
        &["sync", "metrics", "quota", "store", "identity", "config"],
    ),
    (
        "sync",
        &["store", "metrics", "identity", "config", "calendar"],
    ),
    ("metrics", &["quota", "store"]),
    ("quota", &["store", "config", "calendar"]),
    ("store", &["config", "calendar"]),
    ("identity", &[]),
    ("config", &["calendar"]),
    ("calendar", &[]),
];

/// The receiver (`crates/usage-receiver/src/`): its command line on top, then the server
/// (the router and the serve loop), the handlers (`admin`, `ingest`, `views`) over the
/// shared HTTP pieces, budgets, the shared state, the metrics, and the store, the price
/// arithmetic (`billing`) and the day arithmetic (`days`) at the bottom.
const RECEIVER: Table = &[
    ("cli", &["server", "settings", "billing", "store"]),
    (
        "server",
        &[
            "ingest", "views", "admin", "http", "budgets", "state", "metrics", "store", "settings",
            "billing", "days",
        ],
    ),
    (
        "admin",
        &[
            "views", "http", "state", "store", "budgets", "billing", "days", "settings",
        ],
    ),
    (
        "ingest",
        &[
            "http", "state", "store", "budgets", "billing", "days", "settings",
        ],
    ),
    (
        "views",
        &[
            "http", "state", "metrics", "store", "budgets", "billing", "days", "settings",
        ],
    ),
    // Budgets clip the values they log with http's clip, so they sit above it.
    (
        "budgets",
        &["http", "state", "store", "settings", "billing", "days"],
    ),
    ("http", &["state", "store", "settings", "billing", "days"]),
    ("state", &["metrics", "store", "settings", "billing"]),
    // The metrics count what their callers hand in; they know the store's pool figures only.
    ("metrics", &["store"]),
    ("settings", &["billing"]),
    ("store", &["billing", "days"]),
    ("billing", &["days"]),
    ("days", &[]),
];

/// Every layer table, by package name.
const LAYERS: &[(&str, Table)] = &[("usage-agent", AGENT), ("usage-receiver", RECEIVER)];

/// Which other crate of the workspace a crate's code may name (as a path's first segment
/// or anywhere else in code, comments and strings aside), and in which of its top-level
/// modules; an empty list means nowhere. A pair not listed is not checked.
const CRATE_NAMES: &[(&str, &str, &[&str])] = &[
    // The receiver is linked into the agent only for `usage-agent demo` (the `receiver`
    // feature); the site's build has none of it (`site_build.rs`).
    ("usage-agent", "usage_receiver", &["cli"]),
    // A crate the agent stands on never reaches up into it.
    ("usage-protocol", "usage_agent", &[]),
    ("usage-common", "usage_agent", &[]),
    ("usage-receiver", "usage_agent", &[]),
];

// ---------------------------------------------------------------------------------------
// The workspace as read from disk.

/// A module path from its crate's root; the root itself is empty.
type ModulePath = Vec<String>;

/// One crate of the workspace: its modules and the imports between them.
struct Crate {
    /// The package name (`usage-agent`, `usage-receiver`, …).
    name: String,
    /// Every module that is a file (or a directory of files), the root included.
    modules: BTreeSet<ModulePath>,
    files: Vec<SourceFile>,
}

struct SourceFile {
    /// From the workspace root, for the messages.
    path: String,
    module: ModulePath,
    tokens: Vec<Token>,
}

/// One import, resolved to modules of the crate.
struct Edge {
    from: ModulePath,
    to: ModulePath,
    file: String,
}

impl Crate {
    /// Every import of the crate, each path resolved to its longest prefix that is a
    /// module; imports within a module are left out.
    fn edges(&self) -> Vec<Edge> {
        let mut edges = Vec::new();
        for file in &self.files {
            for path in referenced_paths(&file.module, &file.tokens) {
                let to = (0..=path.len())
                    .rev()
                    .map(|len| path[..len].to_vec())
                    .find(|prefix| self.modules.contains(prefix))
                    .expect("the root is a module");
                if to != file.module {
                    edges.push(Edge {
                        from: file.module.clone(),
                        to,
                        file: file.path.clone(),
                    });
                }
            }
        }
        edges
    }

    /// At each level (a module), the imports between its children: for every import from
    /// A to B, neither an ancestor of the other, `a -> b` at their lowest common ancestor,
    /// with the files that make it.
    fn levels(&self) -> BTreeMap<ModulePath, Graph> {
        let mut levels: BTreeMap<ModulePath, Graph> = BTreeMap::new();
        for edge in self.edges() {
            let common = edge
                .from
                .iter()
                .zip(&edge.to)
                .take_while(|(a, b)| a == b)
                .count();
            if common == edge.from.len() || common == edge.to.len() {
                // One is the other's ancestor (an item of a parent's `mod.rs`, or the
                // parent reaching into its child): within one subtree, no level to place.
                continue;
            }
            levels
                .entry(edge.from[..common].to_vec())
                .or_default()
                .entry(edge.from[common].clone())
                .or_default()
                .entry(edge.to[common].clone())
                .or_default()
                .insert(edge.file);
        }
        levels
    }
}

/// At one level: from child, to child, the files that import that way.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The root package and every `crates/*` package, each with its `src/` read.
fn workspace() -> Vec<Crate> {
    let root = workspace_root();
    let mut dirs = vec![root.clone()];
    let mut members: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .expect("read crates/")
        .map(|entry| entry.unwrap().path())
        .filter(|dir| dir.join("Cargo.toml").is_file() && dir.join("src").is_dir())
        .collect();
    members.sort();
    dirs.extend(members);
    dirs.iter().map(|dir| read_crate(&root, dir)).collect()
}

fn read_crate(root: &Path, dir: &Path) -> Crate {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let name =
        package_name(&manifest).unwrap_or_else(|| panic!("no [package] name in {}", dir.display()));
    let src = dir.join("src");
    let mut files = Vec::new();
    let mut modules = BTreeSet::from([ModulePath::new()]);
    let mut pending = vec![src.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let parts: Vec<&str> = relative.iter().map(|part| part.to_str().unwrap()).collect();
            let module = module_of(&parts);
            for len in 0..=module.len() {
                modules.insert(module[..len].to_vec());
            }
            files.push(SourceFile {
                path: path.strip_prefix(root).unwrap().display().to_string(),
                module,
                tokens: tokens(&std::fs::read_to_string(&path).unwrap()),
            });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Crate {
        name,
        modules,
        files,
    }
}

/// The `name = "…"` of a manifest's `[package]`.
fn package_name(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package
            && let Some((key, value)) = line.split_once('=')
            && key.trim() == "name"
        {
            return Some(value.trim().trim_matches('"').to_owned());
        }
    }
    None
}

/// The module of a file, from its path under `src/`: `lib.rs` and `main.rs` are the root,
/// `a/b/mod.rs` and `a/b.rs` are `a::b`.
fn module_of(parts: &[&str]) -> ModulePath {
    let (last, dirs) = parts.split_last().expect("a file");
    let mut module: ModulePath = dirs.iter().map(|dir| (*dir).to_owned()).collect();
    let stem = last.trim_end_matches(".rs");
    let is_root = dirs.is_empty() && matches!(stem, "lib" | "main");
    if !is_root && stem != "mod" {
        module.push(stem.to_owned());
    }
    module
}

fn show(module: &[String]) -> String {
    if module.is_empty() {
        "the crate root".to_owned()
    } else {
        module.join("::")
    }
}

// ---------------------------------------------------------------------------------------
// The path reader.

/// A token of Rust code, comments and literals dropped.
#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    /// `::`, or one punctuation character.
    Punct(String),
}

impl Token {
    fn is(&self, punct: &str) -> bool {
        matches!(self, Token::Punct(p) if p == punct)
    }

    fn ident(&self) -> Option<&str> {
        match self {
            Token::Ident(name) => Some(name),
            Token::Punct(_) => None,
        }
    }
}

/// The identifiers and punctuation of `code`: comments, string, byte-string, raw-string and
/// character literals and lifetimes are dropped (so a `{` in a string or `crate::` in a doc
/// comment is not read).
fn tokens(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i);
        } else if c == '\'' {
            if at(i + 1) == '\\' {
                // '\n', '\'', '\u{…}': the closing quote after the escaped character.
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or a label.
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if matches!(word.as_str(), "r" | "br" | "cr") && matches!(at(i), '"' | '#') {
                let mut hashes = 0;
                while at(i + hashes) == '#' {
                    hashes += 1;
                }
                if at(i + hashes) == '"' {
                    // A raw string: up to a quote followed by as many hashes.
                    i += hashes + 1;
                    while i < chars.len()
                        && !(chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#'))
                    {
                        i += 1;
                    }
                    i += hashes + 1;
                    continue;
                }
                if word == "r" && hashes == 1 {
                    // A raw identifier, `r#type`: read on as the identifier.
                    i += 1;
                    continue;
                }
            }
            if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                i = skip_string(&chars, i);
                continue;
            }
            out.push(Token::Ident(word));
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Token::Punct("::".to_owned()));
            i += 2;
        } else {
            out.push(Token::Punct(c.to_string()));
            i += 1;
        }
    }
    out
}

/// Past the string literal opening at `start` (a `"`), escapes included.
fn skip_string(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Every `crate::…` and `super::…` path in a file of module `module`, from the crate root
/// (not yet resolved to a module). `super` counts from the inline module it is written in
/// (`mod tests { use super::super::X; }` in `a/b.rs` names `a::X`).
fn referenced_paths(module: &[String], tokens: &[Token]) -> Vec<ModulePath> {
    let mut found = Vec::new();
    // Inline modules open around the current token, with the brace depth inside each.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let token = &tokens[i];
        let next_is_path = tokens.get(i + 1).is_some_and(|t| t.is("::"));
        if token.ident() == Some("mod")
            && let Some(name) = tokens.get(i + 1).and_then(Token::ident)
            && tokens.get(i + 2).is_some_and(|t| t.is("{"))
        {
            depth += 1;
            inline.push((name.to_owned(), depth));
            i += 3;
            continue;
        }
        if token.is("{") {
            depth += 1;
        } else if token.is("}") {
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
        } else if next_is_path && matches!(token.ident(), Some("crate" | "super")) {
            // `pub(in crate::a)` is a visibility, not an import.
            let is_visibility =
                i >= 2 && tokens[i - 1].ident() == Some("in") && tokens[i - 2].is("(");
            let follows_path = i >= 1 && tokens[i - 1].is("::");
            if !is_visibility && !follows_path {
                let mut base: ModulePath = if token.ident() == Some("crate") {
                    i += 2;
                    Vec::new()
                } else {
                    module
                        .iter()
                        .cloned()
                        .chain(inline.iter().map(|(name, _)| name.clone()))
                        .collect()
                };
                let mut beyond_root = false;
                while tokens.get(i).and_then(Token::ident) == Some("super")
                    && tokens.get(i + 1).is_some_and(|t| t.is("::"))
                {
                    beyond_root |= base.pop().is_none();
                    i += 2;
                }
                let (paths, end) = use_tree(tokens, i);
                if !beyond_root {
                    for path in paths {
                        found.push(base.iter().cloned().chain(path).collect());
                    }
                }
                i = end;
                continue;
            }
        }
        i += 1;
    }
    found
}

/// The paths of the use tree (or expression path) starting at `start`, just after a
/// `crate::` or `super::`: `a::b::{c, d::{e, self}}` gives `a::b::c`, `a::b::d::e` and
/// `a::b::d`. A path ends at anything but `::` (`as`, `(`, `<`, `*`, `{` of a struct
/// literal, …). Returns where the tree ends.
fn use_tree(tokens: &[Token], start: usize) -> (Vec<ModulePath>, usize) {
    let mut prefix = ModulePath::new();
    let mut i = start;
    loop {
        match tokens.get(i) {
            Some(Token::Ident(name)) if !matches!(name.as_str(), "self" | "super" | "crate") => {
                prefix.push(name.clone());
                i += 1;
                if tokens.get(i).is_some_and(|t| t.is("::")) {
                    i += 1;
                } else {
                    return (vec![prefix], i);
                }
            }
            Some(token) if token.is("{") => {
                i += 1;
                let mut all = Vec::new();
                loop {
                    let (paths, end) = use_tree(tokens, i);
                    all.extend(
                        paths
                            .into_iter()
                            .map(|path| prefix.iter().cloned().chain(path).collect::<ModulePath>()),
                    );
                    // Past a rename (`X as Y`) or `self`, to the item's end.
                    i = end;
                    let mut nested = 0;
                    while let Some(token) = tokens.get(i) {
                        if nested == 0 && (token.is(",") || token.is("}")) {
                            break;
                        }
                        if token.is("{") {
                            nested += 1;
                        } else if token.is("}") {
                            nested -= 1;
                        }
                        i += 1;
                    }
                    match tokens.get(i) {
                        Some(token) if token.is(",") => i += 1,
                        Some(_) => return (all, i + 1),
                        None => return (all, i),
                    }
                }
            }
            _ => return (vec![prefix], i),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The checks.

/// The cycles of one level's graph, each the shortest through one of its edges, rotated to
/// start at its least module and listed once.
fn cycles(graph: &Graph) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for component in strongly_connected(graph) {
        if component.len() < 2 {
            continue;
        }
        for from in &component {
            for to in graph[from].keys().filter(|to| component.contains(*to)) {
                // The shortest way back from `to` to `from`, within the component.
                let mut came_from: BTreeMap<&String, &String> = BTreeMap::new();
                let mut queue = VecDeque::from([to]);
                while let Some(at) = queue.pop_front() {
                    if at == from {
                        break;
                    }
                    for next in graph.get(at).into_iter().flat_map(BTreeMap::keys) {
                        if component.contains(next) && next != to && !came_from.contains_key(next) {
                            came_from.insert(next, at);
                            queue.push_back(next);
                        }
                    }
                }
                let mut back = vec![from.clone()];
                let mut at = from;
                while at != to {
                    at = came_from[at];
                    back.push(at.clone());
                }
                back.reverse();
                // `back` runs to … from; the cycle is from -> to -> … -> from.
                let mut cycle = vec![from.clone()];
                cycle.extend(back.into_iter().take_while(|m| m != from));
                let least = (0..cycle.len()).min_by_key(|&k| &cycle[k]).unwrap();
                cycle.rotate_left(least);
                found.insert(cycle);
            }
        }
    }
    found
}

/// Tarjan's strongly connected components of `graph`.
fn strongly_connected(graph: &Graph) -> Vec<BTreeSet<String>> {
    struct Walk<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a String, usize>,
        low: BTreeMap<&'a String, usize>,
        stack: Vec<&'a String>,
        on_stack: BTreeSet<&'a String>,
        components: Vec<BTreeSet<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a String) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            for next in self.graph.get(node).into_iter().flat_map(BTreeMap::keys) {
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = BTreeSet::new();
                while let Some(member) = self.stack.pop() {
                    self.on_stack.remove(member);
                    component.insert(member.clone());
                    if member == node {
                        break;
                    }
                }
                self.components.push(component);
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for node in graph.keys() {
        if !walk.index.contains_key(node) {
            walk.visit(node);
        }
    }
    walk.components
}

/// Checks one crate's top-level imports against its table in `LAYERS`.
fn follows_its_layers(package: &str) {
    let table: BTreeMap<&str, &[&str]> = LAYERS
        .iter()
        .find(|(name, _)| *name == package)
        .unwrap_or_else(|| panic!("{package} has no table in LAYERS"))
        .1
        .iter()
        .copied()
        .collect();
    let krate = workspace()
        .into_iter()
        .find(|krate| krate.name == package)
        .unwrap_or_else(|| panic!("{package} is no crate of the workspace"));
    let top: BTreeSet<&str> = krate
        .modules
        .iter()
        .filter(|module| module.len() == 1)
        .map(|module| module[0].as_str())
        .collect();
    let levels = krate.levels();
    let imports = levels.get(&ModulePath::new()).cloned().unwrap_or_default();
    let mut wrong = Vec::new();
    for module in &top {
        if !table.contains_key(module) {
            wrong.push(format!("{module} is in no layer (place it in a layer)"));
        }
    }
    for module in table.keys() {
        if !top.contains(module) {
            wrong.push(format!(
                "{module} is in a layer but no module of the crate (remove its row)"
            ));
        }
    }
    for (module, targets) in &imports {
        let Some(may) = table.get(module.as_str()) else {
            continue;
        };
        for (target, files) in targets {
            if !may.contains(&target.as_str()) {
                let files: Vec<&str> = files.iter().map(String::as_str).collect();
                wrong.push(format!(
                    "{module} imports {target}, which its layer may not ({})",
                    files.join(", ")
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{package}: imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_module_of_any_crate_imports_its_way_round_in_a_circle() {
    let mut circles = Vec::new();
    for krate in workspace() {
        for (level, graph) in krate.levels() {
            for cycle in cycles(&graph) {
                let mut line = format!(
                    "{}: {} -> {} (at {})",
                    krate.name,
                    cycle.join(" -> "),
                    cycle[0],
                    show(&level)
                );
                for (k, from) in cycle.iter().enumerate() {
                    let to = &cycle[(k + 1) % cycle.len()];
                    let files: Vec<&str> = graph[from][to].iter().map(String::as_str).collect();
                    line.push_str(&format!("\n    {from} -> {to}: {}", files.join(", ")));
                }
                circles.push(line);
            }
        }
    }
    assert!(
        circles.is_empty(),
        "imports that go round in a circle:\n{}",
        circles.join("\n")
    );
}

#[test]
fn no_module_imports_its_crate_root() {
    let mut wrong = BTreeSet::new();
    for krate in workspace() {
        for edge in krate.edges() {
            if edge.to.is_empty() && !edge.from.is_empty() {
                wrong.insert(format!(
                    "{}: {} imports the crate root ({})",
                    krate.name,
                    show(&edge.from),
                    edge.file
                ));
            }
        }
    }
    let wrong: Vec<String> = wrong.into_iter().collect();
    assert!(
        wrong.is_empty(),
        "the crate root composes its modules; none may import it:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_top_level_import_of_the_agent_follows_its_layers() {
    follows_its_layers("usage-agent");
    // The reader does find imports: not a vacuous pass.
    let agent = workspace()
        .into_iter()
        .find(|krate| krate.name == "usage-agent")
        .unwrap();
    let top = agent
        .levels()
        .remove(&ModulePath::new())
        .unwrap_or_default();
    assert!(
        top.get("api")
            .is_some_and(|targets| targets.contains_key("store")),
        "the reader finds imports: {top:?}"
    );
}

#[test]
fn every_top_level_import_of_the_receiver_follows_its_layers() {
    follows_its_layers("usage-receiver");
}

#[test]
fn each_crate_names_another_crate_of_the_workspace_only_where_allowed() {
    let workspace = workspace();
    let mut wrong = BTreeSet::new();
    for (package, name, only_in) in CRATE_NAMES {
        let krate = workspace
            .iter()
            .find(|krate| krate.name == *package)
            .unwrap_or_else(|| panic!("{package} is no crate of the workspace"));
        for file in &krate.files {
            let top = file.module.first().map_or("the crate root", String::as_str);
            let names = file.tokens.iter().any(|t| t.ident() == Some(name));
            if names && !only_in.contains(&top) {
                wrong.insert(format!("{package}: {} names {name}", file.path));
            }
        }
    }
    let wrong: Vec<String> = wrong.into_iter().collect();
    assert!(
        wrong.is_empty(),
        "crates named where they may not be:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_layer_table_reads_from_top_to_bottom() {
    for (package, table) in LAYERS {
        for (row, (module, may)) in table.iter().enumerate() {
            for target in *may {
                let below = table[row + 1..].iter().any(|(m, _)| m == target);
                assert!(
                    below,
                    "{package}: {module} may import {target}, which is no row below it"
                );
            }
        }
    }
}

#[test]
fn the_import_reader_sees_grouped_and_nested_paths() {
    let code = "use crate::{api::{self, x}, store::Store};\n\
                let y = crate::event::Event::new();\n\
                use crate::a::{b::{c as d, e}, f::*};\n\
                pub(crate) fn g() {}\n\
                pub(in crate::h) fn i() {}\n\
                let s = crate::store::Install { id, ..crate::store::Install::default() };";
    let paths: Vec<String> = referenced_paths(&[], &tokens(code))
        .iter()
        .map(|path| path.join("::"))
        .collect();
    assert_eq!(
        paths,
        [
            "api",
            "api::x",
            "store::Store",
            "event::Event::new",
            "a::b::c",
            "a::b::e",
            "a::f",
            "store::Install",
            "store::Install::default",
        ]
    );
}

#[test]
fn the_import_reader_resolves_super_from_the_file_and_its_inline_modules() {
    let module = vec!["store".to_owned(), "salvage".to_owned()];
    let code = "use super::{Store, health::State};\n\
                fn f() { super::rollup::clamp(); }\n\
                use self::inner::X;\n\
                #[cfg(test)]\n\
                mod tests {\n\
                    use super::*;\n\
                    use super::super::PAGE_SIZE;\n\
                    fn t() { let s = \"}\"; let c = '}'; }\n\
                }\n\
                use super::after::Y;";
    let paths: Vec<String> = referenced_paths(&module, &tokens(code))
        .iter()
        .map(|path| path.join("::"))
        .collect();
    assert_eq!(
        paths,
        [
            "store::Store",
            "store::health::State",
            "store::rollup::clamp",
            "store::salvage",
            "store::PAGE_SIZE",
            "store::after::Y",
        ]
    );
    assert_eq!(module_of(&["lib.rs"]), ModulePath::new());
    assert_eq!(module_of(&["a", "mod.rs"]), ["a"]);
    assert_eq!(module_of(&["a", "b.rs"]), ["a", "b"]);
}

#[test]
fn comments_and_strings_name_no_module() {
    let code = "// use crate::api;\n\
                /* crate::daemon /* nested */ crate::jobs */\n\
                let s = \"crate::cli\"; let r = r#\"crate::sync \"quoted\"\"#;\n\
                let b = b\"crate::state\"; fn f<'a>(x: &'a str) {}\n\
                /// crate::metrics\n\
                use crate::calendar::Day;";
    let paths: Vec<ModulePath> = referenced_paths(&[], &tokens(code));
    assert_eq!(paths, [vec!["calendar".to_owned(), "Day".to_owned()]]);
}

#[test]
fn a_circle_of_three_is_found_and_a_line_is_not() {
    let graph = |edges: &[(&str, &str)]| {
        let mut graph = Graph::new();
        for (from, to) in edges {
            graph
                .entry((*from).to_owned())
                .or_default()
                .entry((*to).to_owned())
                .or_default()
                .insert("file".to_owned());
        }
        graph
    };
    let round = cycles(&graph(&[("b", "c"), ("c", "a"), ("a", "b"), ("c", "d")]));
    assert_eq!(
        round,
        BTreeSet::from([vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]])
    );
    assert!(cycles(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])).is_empty());
}
