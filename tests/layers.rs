//! The import rules of `src/lib.rs`'s "Layers" section, checked on the source: only the
//! composition layer (`startup`, `state`, `routes`) names `AppState`, `StartupError` or the
//! `startup`/`state` modules, and no two top-level modules import each other, directly or through
//! others. Test code (`#[cfg(test)] mod tests` at the bottom of a file) is left out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Cycles tolerated for now: none. A pair listed here would be reported no more.
const KNOWN_CYCLES: &[&[&str]] = &[];

const COMPOSITION: &[&str] = &["startup", "state", "routes", "main", "lib"];

/// Top-level module -> the top-level modules its non-test code names as `crate::X`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => &text[..i],
                None => &text[..],
            };
            let targets = graph.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top && name.chars().next().is_some_and(|c| c.is_lowercase()) {
                    targets.insert(name);
                }
            }
            if !COMPOSITION.contains(&top.as_str()) {
                for forbidden in ["AppState", "StartupError"] {
                    assert!(
                        !code.contains(forbidden),
                        "{} names {forbidden}: only the composition layer may",
                        rel.display()
                    );
                }
            }
        }
    }
    graph
}

/// Whether `to` is reachable from `from`.
fn reaches(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    while let Some(m) = stack.pop() {
        for next in graph.get(&m).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    false
}

#[test]
fn nothing_below_the_composition_layer_imports_it() {
    let graph = imports();
    for (module, targets) in &graph {
        if COMPOSITION.contains(&module.as_str()) {
            continue;
        }
        for upper in ["startup", "state", "routes"] {
            assert!(!targets.contains(upper), "{module} imports crate::{upper}");
        }
    }
}

#[test]
fn no_two_modules_import_each_other() {
    let graph = imports();
    let known = |a: &str, b: &str| KNOWN_CYCLES.iter().any(|c| c.contains(&a) && c.contains(&b));
    let mut cycles = Vec::new();
    for (module, targets) in &graph {
        for target in targets {
            if module < target && reaches(&graph, target, module) && !known(module, target) {
                cycles.push(format!("{module} <-> {target}"));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:?}\n{graph:#?}");
}
