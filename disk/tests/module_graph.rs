//! The crate's modules import each other in one direction only, but for the documented cycle:
//! formats open backing files of any format through `image::open_image`, which dispatches back
//! to them (see the crate doc). Read from the source text, so a new cycle fails here.
//!
//! A node is a top-level module (a folder module such as `qcow2/` is one node; `lib` is the
//! crate root's own items). Names used through the crate root's re-exports count as imports of
//! the module that defines them. Test code (`#[cfg(test)]` modules) is left out.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Source text without line comments and without the trailing `#[cfg(test)] mod tests { .. }`.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut attrs = String::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let trimmed = code.trim();
        if trimmed.starts_with("#[") {
            attrs.push_str(trimmed);
            continue;
        }
        if attrs.contains("#[cfg(test)]") && trimmed.starts_with("mod ") && trimmed.ends_with('{') {
            break; // Test modules come last in every file.
        }
        if !trimmed.is_empty() {
            attrs.clear();
        }
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Identifiers that follow `crate::`, including each item of a `crate::{a, b::c, D}` group.
fn crate_names(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.extend(first_ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
            names.extend(first_ident(&item));
        } else {
            names.extend(first_ident(rest));
        }
    }
    names
}

fn first_ident(text: &str) -> Option<String> {
    let ident: String =
        text.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!ident.is_empty()).then_some(ident)
}

/// Which module each name re-exported by `pub use module::{..}` in lib.rs comes from.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut owner = BTreeMap::new();
    for stmt in lib.split(';') {
        let Some(path) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        for name in items.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if !name.is_empty() {
                owner.insert(name.to_string(), module.to_string());
            }
        }
    }
    owner
}

fn graph(src: &Path) -> Graph {
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            if path.extension().is_none_or(|e| e != "rs") || rel.ends_with("tests.rs") {
                continue;
            }
            let first = rel.components().next().unwrap().as_os_str().to_str().unwrap();
            let node = if rel == Path::new("lib.rs") { "lib" } else { first };
            let node = node.trim_end_matches(".rs").to_string();
            let code = code_of(&std::fs::read_to_string(&path).unwrap());
            texts.entry(node).or_default().push_str(&code);
        }
    }
    let lib = texts["lib"].clone();
    let owner = reexports(&lib);
    // lib.rs's `mod` and `pub use` lines are the crate's facade, not imports of its own items.
    let lib_body: String = lib
        .lines()
        .filter(|l| {
            !(l.starts_with("pub use ") || l.starts_with("mod ") || l.starts_with("pub mod "))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut graph = Graph::new();
    for (node, code) in &texts {
        let mut names = if node == "lib" { crate_names(&lib_body) } else { crate_names(code) };
        if node == "lib" {
            let words: BTreeSet<&str> =
                lib_body.split(|c: char| !(c.is_alphanumeric() || c == '_')).collect();
            names.extend(owner.keys().filter(|n| words.contains(n.as_str())).cloned());
        }
        let targets = names
            .into_iter()
            .map(|name| {
                if texts.contains_key(&name) {
                    name
                } else {
                    owner.get(&name).cloned().unwrap_or_else(|| "lib".to_string())
                }
            })
            .filter(|target| target != node)
            .collect();
        graph.insert(node.clone(), targets);
    }
    graph
}

/// A cycle in `graph`, if it has one (depth-first search for a back edge).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_only_import_cycle_is_formats_opening_parents_through_open_image() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    // The graph is read at all: the dispatch reaches the formats, and qcow2 its parents.
    assert!(graph["image"].contains("qcow2") && graph["image"].contains("vmdk"), "{graph:#?}");
    assert!(graph["qcow2"].contains("image"), "{graph:#?}");
    // Without the edges into `image` (formats opening parents), nothing loops.
    let mut cut = graph.clone();
    for targets in cut.values_mut() {
        targets.remove("image");
    }
    assert_eq!(find_cycle(&cut), None, "{graph:#?}");
    // And what those edges import from `image` is `open_image` only.
    for (node, targets) in &graph {
        if node == "lib" || !targets.contains("image") {
            continue;
        }
        let mut code = String::new();
        for file in [format!("{node}.rs"), format!("{node}/mod.rs")] {
            if let Ok(text) = std::fs::read_to_string(src.join(file)) {
                code.push_str(&code_of(&text));
            }
        }
        let from_image: BTreeSet<String> = crate_names(&code)
            .into_iter()
            .filter(|n| n == "image" || reexports_of_image(&src).contains(n))
            .collect();
        assert_eq!(from_image, BTreeSet::from(["open_image".to_string()]), "{node}");
    }
}

#[test]
fn a_module_graph_with_a_cycle_is_caught() {
    let mut graph = Graph::new();
    graph.insert("detect".into(), BTreeSet::from(["vmdk".into()]));
    graph.insert("vmdk".into(), BTreeSet::from(["detect".into(), "lib".into()]));
    graph.insert("lib".into(), BTreeSet::new());
    assert_eq!(find_cycle(&graph), Some(vec!["detect".into(), "vmdk".into(), "detect".into()]));
}

fn reexports_of_image(src: &Path) -> BTreeSet<String> {
    let lib = code_of(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    reexports(&lib).into_iter().filter(|(_, m)| m == "image").map(|(n, _)| n).collect()
}
