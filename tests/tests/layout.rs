//! The code's shape: no two modules of a crate use each other, directly or through others
//! (an import circle means two concerns that cannot be read, tested or changed apart).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The modules of the crate whose sources are under `src` (a module per file: `a/b.rs` and
/// `a/b/mod.rs` are `a::b`; `main.rs`, `lib.rs` are the root, ``).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "main" | "lib")
            ) {
                parts.pop();
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// Paths the source names from the crate's root: `crate::a::b`, `super::…` made absolute,
/// and the members of `use crate::{a, b::{c, d}}` groups, each as its list of segments.
fn crate_paths(module: &str, text: &str) -> Vec<Vec<String>> {
    // Comments and strings say nothing about imports.
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let here: Vec<String> = module
        .split("::")
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let (base, skip) = if rest.starts_with(b"crate::") && (i == 0 || !is_ident(bytes[i - 1])) {
            (Vec::new(), "crate::".len())
        } else if rest.starts_with(b"super::") && (i == 0 || !is_ident(bytes[i - 1])) {
            let mut b = here.clone();
            b.pop();
            (b, "super::".len())
        } else {
            i += 1;
            continue;
        };
        i += skip;
        parse_tree(&code, &mut i, base, &mut out);
    }
    out
}

/// Reads a use tree at `*i` (segments, `{…}` groups) below `base`.
fn parse_tree(code: &str, i: &mut usize, base: Vec<String>, out: &mut Vec<Vec<String>>) {
    let b = code.as_bytes();
    let mut path = base;
    loop {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
        if *i < b.len() && b[*i] == b'{' {
            *i += 1;
            loop {
                while *i < b.len() && (b[*i].is_ascii_whitespace() || b[*i] == b',') {
                    *i += 1;
                }
                if *i >= b.len() || b[*i] == b'}' {
                    *i += 1;
                    return;
                }
                if b[*i..].starts_with(b"self") {
                    out.push(path.clone());
                    *i += 4;
                    continue;
                }
                parse_tree(code, i, path.clone(), out);
            }
        }
        let start = *i;
        while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_') {
            *i += 1;
        }
        if *i == start {
            out.push(path);
            return;
        }
        path.push(code[start..*i].to_string());
        if b[*i..].starts_with(b"::") {
            *i += 2;
            continue;
        }
        out.push(path);
        return;
    }
}

/// The module edges of the crate under `src`: (user, used), both modules of the crate, a
/// module never counted as using its own parent or children.
fn edges(src: &Path) -> BTreeSet<(String, String)> {
    let mods = modules(src);
    let mut e = BTreeSet::new();
    for (m, p) in &mods {
        let text = std::fs::read_to_string(p).unwrap();
        for path in crate_paths(m, &text) {
            // The longest prefix that is a module.
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|c| mods.contains_key(c));
            let Some(t) = target else { continue };
            let related = t == *m
                || m.starts_with(&format!("{t}::"))
                || t.starts_with(&format!("{m}::"))
                || t.is_empty()
                || m.is_empty();
            if !related {
                e.insert((m.clone(), t));
            }
        }
    }
    e
}

/// The import circles among the modules: each as the modules on it, in order.
fn circles(e: &BTreeSet<(String, String)>) -> Vec<Vec<String>> {
    let mut adj: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in e {
        adj.entry(a).or_default().push(b);
    }
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    for start in adj.keys() {
        // Depth-first from `start`, looking for a way back to it through larger names only
        // (each circle is reported once, from its smallest member).
        let mut stack: Vec<(Vec<&str>, usize)> = vec![(vec![start], 0)];
        while let Some((path, k)) = stack.pop() {
            let last = *path.last().unwrap();
            let next = adj.get(last).map(|v| v.as_slice()).unwrap_or(&[]);
            if k >= next.len() {
                continue;
            }
            stack.push((path.clone(), k + 1));
            let n = next[k];
            if n == *start {
                found.insert(path.iter().map(|s| s.to_string()).collect());
            } else if n > *start && !path.contains(&n) && path.len() < 8 {
                let mut p = path.clone();
                p.push(n);
                stack.push((p, 0));
            }
        }
    }
    found.into_iter().collect()
}

#[test]
fn no_import_circles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut report = Vec::new();
    for krate in [
        "router-ctl",
        "router-ebpf",
        "router-common",
        "benches",
        "tests",
        "xtask",
    ] {
        let src = root.join(krate).join("src");
        let e = edges(&src);
        for c in circles(&e) {
            report.push(format!("{krate}: {} -> {}", c.join(" -> "), c[0]));
        }
    }
    assert!(
        report.is_empty(),
        "import circles (each module uses the next):\n{}",
        report.join("\n")
    );
}

/// The checker sees what it must: a circle through a `use crate::{…}` group and one through
/// `super::`.
#[test]
fn the_circle_check_finds_circles() {
    let a = "use crate::{b::{self, thing}, c};\nfn f() { crate::d::g(); }";
    let paths = crate_paths("a", a);
    assert!(paths.contains(&vec!["b".to_string()]));
    assert!(paths.contains(&vec!["b".to_string(), "thing".to_string()]));
    assert!(paths.contains(&vec!["c".to_string()]));
    assert!(paths.contains(&vec!["d".to_string(), "g".to_string()]));
    let sup = crate_paths("x::y", "use super::z::Q;");
    assert_eq!(
        sup,
        vec![vec!["x".to_string(), "z".to_string(), "Q".to_string()]]
    );
    let e: BTreeSet<(String, String)> = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .iter()
        .map(|(x, y)| (x.to_string(), y.to_string()))
        .collect();
    assert_eq!(circles(&e), vec![vec!["a", "b", "c"]]);
}

/// A binary's own modules (`main.rs` with `mod cli;`, and `cli/…` beside the library's files)
/// are checked like the library's: a circle between two of them is found, and their use of
/// their parent (`super::Format`) is not one.
#[test]
fn the_circle_check_sees_a_binarys_modules() {
    let dir = std::env::temp_dir().join(format!("layout-bin-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("cli")).unwrap();
    for (path, text) in [
        ("lib.rs", "pub mod store;"),
        ("store.rs", ""),
        ("main.rs", "mod cli;\nuse cli::verbs::after;\nfn main() {}"),
        (
            "cli/mod.rs",
            "pub mod show;\npub mod verbs;\npub enum Format {}",
        ),
        ("cli/show.rs", "use super::verbs::after;\npub fn show() {}"),
        (
            "cli/verbs.rs",
            "use super::{show::show, Format};\npub fn after() {}",
        ),
    ] {
        std::fs::write(src.join(path), text).unwrap();
    }
    let e = edges(&src);
    std::fs::remove_dir_all(&dir).unwrap();
    let want: BTreeSet<(String, String)> =
        [("cli::show", "cli::verbs"), ("cli::verbs", "cli::show")]
            .iter()
            .map(|(x, y)| (x.to_string(), y.to_string()))
            .collect();
    assert_eq!(e, want);
    assert_eq!(circles(&e), vec![vec!["cli::show", "cli::verbs"]]);
}
