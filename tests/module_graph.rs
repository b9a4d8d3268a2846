//! No import loops inside `src/`: the daemon's top-level modules form a directed acyclic
//! graph, so data flows one way (ingest → spool → dispatch → policy → brokers, reports to
//! telemetry/metrics) and each module can be read without the ones that read it.
//!
//! How: every `.rs` file under `src/` (except the binary's own: `main.rs` and `src/demo/`) is a node named after
//! its top-level module (`src/dispatch/queue.rs` is `dispatch`, `src/lib.rs` is `lib`, the
//! crate root). An edge `a → b` is each `crate::b` path in `a`'s code (also inside
//! `use crate::{…}` groups), and in `lib.rs` each `b::` path. A `crate::Item` re-exported by
//! `lib.rs` (`pub use config::Config`) points at the module that defines it; items defined
//! in `lib.rs` itself (`start`, `Daemon`) point at `lib`. `mod` declarations, comments and
//! `#[cfg(test)] mod tests` blocks are not edges. Run it with
//! `cargo test --test module_graph`; a loop fails with the loop spelled out.
//!
//! Inside each folder module (`src/dispatch/`) the same holds file by file: no two sibling
//! files import each other, directly or around a ring ([`file_graph`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // `src/demo/` belongs to the binary (declared by `main.rs`), not the library.
            if path.file_name().is_some_and(|n| n == "demo") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code without comments and without its `#[cfg(test)]` test module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Identifiers that directly follow `prefix` (`crate::` → `dispatch`, `{Config`, …).
fn names_after(code: &str, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c, D}`: the first name of each top-level item.
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.push(name);
                }
            }
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            names.push(name);
        }
    }
    names
}

/// `pub use module::…::Item;` lines of the crate root: item → module.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in lib.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim_end_matches(';');
        let Some((module, _)) = path.split_once("::") else {
            continue;
        };
        let items = path.rsplit("::").next().unwrap_or("");
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let item = item.trim();
            let item = item.rsplit(" as ").next().unwrap_or(item);
            if !item.is_empty() {
                map.insert(item.to_owned(), module.to_owned());
            }
        }
    }
    map
}

fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let node_of = |path: &Path| {
        let rel = path.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        first.trim_end_matches(".rs").to_owned()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| node_of(p))
        .filter(|n| n != "lib" && n != "main")
        .collect();
    let lib_text = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexported = reexports(&code_of(&lib_text));
    let mut graph = Graph::new();
    for path in &files {
        let node = node_of(path);
        if node == "main" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(path).unwrap());
        let mut targets = names_after(&code, "crate::");
        if node == "lib" {
            targets.extend(
                modules
                    .iter()
                    .filter(|m| {
                        !names_after(&code, &format!("{m}::")).is_empty() || {
                            // `b::` at the start of a path, not `a::b::`
                            code.contains(&format!(" {m}::")) || code.contains(&format!("({m}::"))
                        }
                    })
                    .cloned(),
            );
        }
        let edges = graph.entry(node.clone()).or_default();
        for name in targets {
            let target = if modules.contains(&name) {
                name
            } else if let Some(module) = reexported.get(&name) {
                module.clone()
            } else {
                "lib".to_owned()
            };
            if target != node {
                edges.insert(target);
            }
        }
    }
    graph
}

/// A loop in `graph`, as the list of nodes around it (first node repeated at the end).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut done, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn src_modules_import_each_other_without_loops() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    // The graph is really read: dispatch reports to telemetry, admin_api uses suspensions.
    assert!(graph["dispatch"].contains("telemetry"), "{graph:#?}");
    assert!(graph["admin_api"].contains("suspensions"), "{graph:#?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import loop in src/: {}\nmodule graph (module → what it uses):\n{graph:#?}",
            cycle.join(" → ")
        );
    }
}

/// The files of one folder module (`src/dispatch/`) as nodes; an edge is each `super::x`
/// or `crate::folder::x` path to a sibling file. An item re-exported by `mod.rs` points at
/// the file that defines it. Items that `mod.rs` defines itself (the context its children
/// share, like `WorkerEnv`) are not edges: the folder's root declares its children and
/// holds what they share, as `lib.rs` does for the crate, so a loop through it says nothing
/// about the siblings.
fn file_graph(folder: &Path) -> Graph {
    let name = folder.file_name().unwrap().to_string_lossy().into_owned();
    let mut files = Vec::new();
    rust_files(folder, &mut files);
    let stem = |p: &Path| p.file_stem().unwrap().to_string_lossy().into_owned();
    let siblings: BTreeSet<String> = files.iter().map(|p| stem(p)).collect();
    let mod_text = code_of(&std::fs::read_to_string(folder.join("mod.rs")).unwrap());
    let reexported = reexports(&mod_text);
    let mut graph = Graph::new();
    for path in &files {
        let node = stem(path);
        let code = code_of(&std::fs::read_to_string(path).unwrap());
        let mut targets = names_after(&code, "super::");
        targets.extend(names_after(&code, &format!("crate::{name}::")));
        let edges = graph.entry(node.clone()).or_default();
        for target in targets {
            let target = if siblings.contains(&target) {
                target
            } else if let Some(file) = reexported.get(&target) {
                file.clone()
            } else {
                continue; // defined in mod.rs
            };
            if target != node && target != "mod" {
                edges.insert(target);
            }
        }
    }
    graph
}

#[test]
fn files_inside_each_src_folder_import_each_other_without_loops() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut folders = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let folder = entry.unwrap().path();
        if !folder.join("mod.rs").is_file() || folder.ends_with("demo") {
            continue;
        }
        folders += 1;
        let graph = file_graph(&folder);
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "import loop in {}: {}\nfile graph (file → what it uses):\n{graph:#?}",
                folder.display(),
                cycle.join(" → ")
            );
        }
        if folder.ends_with("dispatch") {
            // Really read: a queue's worker uses its connection pool.
            assert!(graph["queue"].contains("connection"), "{graph:#?}");
        }
    }
    assert!(folders > 0, "no folder module under src/");
}

#[test]
fn the_loop_finder_finds_a_loop() {
    let graph: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .into_iter()
        .fold(Graph::new(), |mut g, (from, to)| {
            g.entry(from.into()).or_default().insert(to.into());
            g
        });
    assert_eq!(
        find_cycle(&graph).map(|c| c.join(" → ")).as_deref(),
        Some("a → b → c → a")
    );
    let mut acyclic = graph.clone();
    acyclic.get_mut("c").unwrap().remove("a");
    assert_eq!(find_cycle(&acyclic), None);
}
