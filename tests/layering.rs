//! The layering rule of DESIGN.md, checked on the source: the top-level
//! modules of `src/` and which others each one names (`crate::x`, `super::`
//! up to the crate root, exported macros by their defining module). The
//! binary (`main.rs`) and `lib.rs` may name anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// Import nothing of the message path: only other leaves.
const LEAVES: [&str; 9] = [
    "config",
    "reply",
    "secret",
    "observe",
    "provider_replies",
    "terminal",
    "private_files",
    "address",
    "maildrop",
];

/// Consumers at the top and the only modules that may name each: the
/// composition root starts the admin interface; `cli` talks to it. Nothing
/// calls `cli` or `sendmail` but `main.rs`.
const CONSUMERS: [(&str, &[&str]); 3] = [
    ("admin", &["relay", "cli"]),
    ("cli", &[]),
    ("sendmail", &[]),
];

/// Top-level module → the other top-level modules it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn the_source_keeps_the_layering_rule() {
    let graph = source_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.contains_key("relay") && graph.contains_key("config"));
    let violations = violations(&graph);
    assert!(
        violations.is_empty(),
        "layering rule broken (DESIGN.md):\n{}",
        violations.join("\n")
    );
}

#[test]
fn imports_are_read_from_paths_groups_supers_and_macros() {
    let macros =
        HashMap::from(["out", "outln"].map(|name| (name.to_string(), "terminal".to_string())));
    // (file's module path, source, top-level modules named)
    let cases: [(&[&str], &str, &[&str]); 9] = [
        (
            &["server"],
            "use crate::session::{Session, SessionEnd};",
            &["session"],
        ),
        (
            &["cli"],
            "use crate::{admin, spool::Spool};",
            &["admin", "spool"],
        ),
        (&["cli"], "use crate::{a::{b, c}, d};", &["a", "d"]),
        (
            &["oauth", "status"],
            "use crate::{out, outln};",
            &["terminal"],
        ),
        (
            &["delivery"],
            "let x = crate::observe::metrics::count();",
            &["observe"],
        ),
        (&["relay", "process"], "use super::Reloader;", &["relay"]),
        (&["server"], "use super::admin;", &["admin"]),
        (
            &["session", "sign_in"],
            "mod tests {\n    use super::super::SessionContext;\n}\nuse super::super::policy;",
            &["session", "policy"],
        ),
        (
            &["config"],
            "// see crate::admin\nuse crate::secret::Secret; // crate::cli",
            &["secret"],
        ),
    ];
    for (module, source, expected) in cases {
        let found = imports(module, source, &macros);
        let expected: BTreeSet<String> = expected.iter().map(|m| m.to_string()).collect();
        assert_eq!(found, expected, "{source}");
    }
}

#[test]
fn violations_name_consumers_called_from_below_leaves_on_the_path_and_cycles() {
    let graph = |edges: &[(&str, &str)]| {
        let mut graph = Graph::new();
        for (from, to) in edges {
            graph
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string());
            graph.entry(to.to_string()).or_default();
        }
        graph
    };
    // (edges, violations)
    type Edges<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Edges, &[&str]); 7] = [
        (
            &[
                ("relay", "admin"),
                ("cli", "admin"),
                ("admin", "spool"),
                ("spool", "config"),
            ],
            &[],
        ),
        (&[("delivery", "admin")], &["delivery imports admin"]),
        (&[("admin", "cli")], &["admin imports cli"]),
        (&[("relay", "cli")], &["relay imports cli"]),
        (&[("observe", "config"), ("config", "secret")], &[]),
        (&[("config", "spool")], &["config (a leaf) imports spool"]),
        (
            &[
                ("spool", "delivery"),
                ("delivery", "transport"),
                ("transport", "spool"),
            ],
            &["import cycle among delivery, spool, transport"],
        ),
    ];
    for (edges, expected) in cases {
        assert_eq!(violations(&graph(edges)), expected, "{edges:?}");
    }
}

/// What breaks the rule, one line each.
fn violations(graph: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for (module, imported) in graph {
        for target in imported {
            let consumer = CONSUMERS.iter().find(|(name, _)| name == target);
            if let Some((_, allowed)) = consumer {
                if !allowed.contains(&module.as_str()) {
                    found.push(format!("{module} imports {target}"));
                }
            }
            if LEAVES.contains(&module.as_str()) && !LEAVES.contains(&target.as_str()) {
                found.push(format!("{module} (a leaf) imports {target}"));
            }
        }
    }
    // Each group of modules that import one another, once.
    let mut cycles = BTreeSet::new();
    for module in graph.keys() {
        let group: Vec<&String> = graph
            .keys()
            .filter(|other| reaches(graph, module, other) && reaches(graph, other, module))
            .collect();
        if !group.is_empty() {
            cycles.insert(group);
        }
    }
    for group in cycles {
        let names: Vec<&str> = group.iter().map(|name| name.as_str()).collect();
        found.push(format!("import cycle among {}", names.join(", ")));
    }
    found
}

/// Whether `from` imports `to`, directly or through others.
fn reaches(graph: &Graph, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut next = vec![from];
    while let Some(module) = next.pop() {
        for imported in graph.get(module).into_iter().flatten() {
            if imported == to {
                return true;
            }
            if seen.insert(imported.as_str()) {
                next.push(imported);
            }
        }
    }
    false
}

/// The graph of the crate in `src`: each top-level module with what its
/// files name, other top-level modules only.
fn source_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let sources: Vec<(Vec<String>, String)> = files
        .iter()
        .map(|file| {
            let relative = file.strip_prefix(src).expect("under src");
            (
                module_path(relative),
                std::fs::read_to_string(file).unwrap(),
            )
        })
        .filter(|(module, _)| !module.is_empty())
        .collect();
    let macros = exported_macros(&sources);
    let mut graph = Graph::new();
    for (module, _) in &sources {
        graph.entry(module[0].clone()).or_default();
    }
    for (module, source) in &sources {
        let path: Vec<&str> = module.iter().map(String::as_str).collect();
        let named = imports(&path, source, &macros);
        let top = &module[0];
        let others = named
            .into_iter()
            .filter(|name| name != top && graph.contains_key(name));
        let others: Vec<String> = others.collect();
        graph.get_mut(top).expect("added above").extend(others);
    }
    graph
}

fn rust_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// `server.rs` → [server], `session/mod.rs` → [session], `relay/process.rs`
/// → [relay, process]; `main.rs` and `lib.rs` → [] (not checked).
fn module_path(relative: &Path) -> Vec<String> {
    let mut path: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    if path == ["main"] || path == ["lib"] {
        path.clear();
    }
    path
}

/// `#[macro_export]` macros live at the crate root; by the module that
/// defines them.
fn exported_macros(sources: &[(Vec<String>, String)]) -> HashMap<String, String> {
    let mut macros = HashMap::new();
    for (module, source) in sources {
        let mut lines = source.lines();
        while let Some(line) = lines.next() {
            if line.trim() != "#[macro_export]" {
                continue;
            }
            let definition = lines.next().unwrap_or_default().trim();
            if let Some(rest) = definition.strip_prefix("macro_rules!") {
                let name = rest.trim().trim_end_matches('{').trim();
                macros.insert(name.to_string(), module[0].clone());
            }
        }
    }
    macros
}

/// The top-level modules named in `source`, the file of module `module`
/// (comments left out).
fn imports(module: &[&str], source: &str, macros: &HashMap<String, String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    // Indents of the inline modules (`mod tests {`) the line is in.
    let mut inline: Vec<usize> = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let indent = code.len() - code.trim_start().len();
        if inline.last() == Some(&indent) && code.trim() == "}" {
            inline.pop();
        }
        let words: Vec<&str> = code.split_whitespace().collect();
        if words.last() == Some(&"{") && words.iter().rev().nth(2) == Some(&"mod") {
            inline.push(indent);
        }
        let depth = module.len() + inline.len();
        for (at, _) in code.match_indices("crate::") {
            if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue;
            }
            found.extend(first_segments(&code[at + "crate::".len()..]));
        }
        for (at, _) in code.match_indices("super::") {
            let before = &code[..at];
            if before.ends_with("super::")
                || before.ends_with(|c: char| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let mut rest = &code[at..];
            let mut ups = 0;
            while let Some(after) = rest.strip_prefix("super::") {
                ups += 1;
                rest = after;
            }
            if ups < depth {
                found.insert(module[0].to_string());
            } else {
                found.extend(first_segments(rest));
            }
        }
    }
    found
        .into_iter()
        .map(|name| macros.get(&name).cloned().unwrap_or(name))
        .collect()
}

/// `session::X` → [session]; `{a::{b, c}, d}` → [a, d].
fn first_segments(path: &str) -> Vec<String> {
    let ident = |text: &str| -> String {
        text.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = path.strip_prefix('{') else {
        return vec![ident(path)];
    };
    let mut segments = Vec::new();
    let (mut depth, mut item_start) = (0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                segments.push(ident(&group[item_start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                segments.push(ident(&group[item_start..i]));
                item_start = i + 1;
            }
            _ => {}
        }
    }
    segments.retain(|segment| !segment.is_empty());
    segments
}
