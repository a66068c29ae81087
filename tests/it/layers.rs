//! The module graph of `src/` (ARCHITECTURE.md, "Layers"): every `crate::` path in a
//! top-level module must point at a module that module may import. Read from the source,
//! tests included, so an upward import fails here before it becomes a loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What each top-level module of `src/` may import, by layer from the top. A module
/// missing from this table fails the test until it is placed in a layer.
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "cli",
        &[
            "daemon", "api", "jobs", "state", "sync", "store", "metrics", "identity", "receiver",
            "protocol", "event", "config", "calendar",
        ],
    ),
    (
        "daemon",
        &[
            "api", "jobs", "state", "sync", "store", "metrics", "identity", "config", "calendar",
            "event", "server",
        ],
    ),
    (
        "api",
        &[
            "jobs",
            "state",
            "sync",
            "store",
            "metrics",
            "identity",
            "event",
            "config",
            "calendar",
            "credentials",
        ],
    ),
    (
        "jobs",
        &[
            "state", "sync", "store", "metrics", "event", "config", "calendar",
        ],
    ),
    ("state", &["sync", "store", "metrics", "identity", "config"]),
    (
        "sync",
        &[
            "store", "metrics", "identity", "protocol", "event", "config", "calendar",
        ],
    ),
    ("metrics", &["store", "event"]),
    (
        "store",
        &[
            "event",
            "config",
            "calendar",
            "gather_vfs",
            "private_file",
            "sqlite_check",
        ],
    ),
    ("identity", &["protocol"]),
    // The provider's backend: beside the agent, never on top of it.
    (
        "receiver",
        &[
            "protocol",
            "event",
            "calendar",
            "gather_vfs",
            "server",
            "credentials",
            "private_file",
            "sqlite_check",
            "toml_place",
        ],
    ),
    ("protocol", &["event"]),
    ("config", &["calendar", "toml_place"]),
    ("event", &[]),
    ("calendar", &[]),
    ("gather_vfs", &[]),
    ("server", &[]),
    ("credentials", &[]),
    ("private_file", &[]),
    ("sqlite_check", &[]),
    ("toml_place", &[]),
];

/// The top-level modules each module of `src/` names in `crate::` paths.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
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
            let first = relative.components().next().unwrap();
            let module = first.as_os_str().to_str().unwrap().trim_end_matches(".rs");
            if matches!(module, "lib" | "main") {
                continue;
            }
            let code: String = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let targets = graph.entry(module.to_owned()).or_default();
            for target in crate_paths(&code) {
                if target != module {
                    targets.insert(target);
                }
            }
        }
    }
    graph
}

/// The first segment after every `crate::` in `code`, expanding `crate::{a, b::c}`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            found.push(first_segment(&item));
        } else {
            found.push(first_segment(rest));
        }
    }
    found.retain(|name| !name.is_empty() && name != "self");
    found
}

fn first_segment(path: &str) -> String {
    path.trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn every_import_between_top_level_modules_follows_the_layers() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let graph = imports();
    let mut wrong = Vec::new();
    for (module, targets) in &graph {
        let Some(may) = allowed.get(module.as_str()) else {
            wrong.push(format!("{module} is in no layer (add it to ALLOWED)"));
            continue;
        };
        for target in targets {
            if !may.contains(&target.as_str()) {
                wrong.push(format!("{module} imports {target}"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers: {wrong:#?}");
    assert!(
        graph["receiver"].contains("protocol"),
        "the reader finds imports: {graph:?}"
    );
}

#[test]
fn no_two_top_level_modules_import_each_other() {
    let graph = imports();
    let mut loops = Vec::new();
    for (module, targets) in &graph {
        for target in targets {
            if module < target && graph.get(target).is_some_and(|back| back.contains(module)) {
                loops.push(format!("{module} <-> {target}"));
            }
        }
    }
    assert!(loops.is_empty(), "two-way imports: {loops:?}");
}

#[test]
fn the_import_reader_sees_grouped_and_nested_paths() {
    let code = "use crate::{api::{self, x}, store::Store};\nlet y = crate::event::Event::new();";
    assert_eq!(crate_paths(code), ["api", "store", "event"]);
}
