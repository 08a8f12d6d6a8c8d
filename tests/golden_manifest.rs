//! golden/ is exactly what golden/manifest.json lists: every listed file exists with its sha256, and
//! nothing else is there (README.md aside). A mismatch names the file and the command that regenerates it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn golden_dir() -> PathBuf {
    lockstep::golden::default_dir()
}

fn files_under(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, root, out);
        } else {
            out.insert(path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/"));
        }
    }
}

#[test]
fn golden_files_match_the_manifest() {
    let dir = golden_dir();
    let manifest_path = dir.join("manifest.json");
    let text =
        std::fs::read_to_string(&manifest_path).unwrap_or_else(|e| panic!("{}: {e}; run ci/regenerate-golden to create the goldens", manifest_path.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not valid JSON: {e}", manifest_path.display()));
    let files = manifest["files"].as_array().expect("manifest.json has no `files` list");
    assert!(!files.is_empty(), "manifest.json lists no files");

    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for f in files {
        let rel = f["path"].as_str().expect("a manifest entry without `path`");
        let want = f["sha256"].as_str().expect("a manifest entry without `sha256`");
        listed.insert(rel.to_string());
        match std::fs::read(dir.join(rel)) {
            Err(e) => problems.push(format!("golden/{rel}: listed in the manifest but unreadable: {e}")),
            Ok(bytes) => {
                let got = hex::encode(Sha256::digest(&bytes));
                if got != want {
                    problems.push(format!("golden/{rel}: sha256 {got}, the manifest says {want}"));
                }
            }
        }
    }
    let mut present = BTreeSet::new();
    files_under(&dir, &dir, &mut present);
    for rel in present.difference(&listed) {
        if rel != "manifest.json" && rel != "README.md" {
            problems.push(format!("golden/{rel}: not listed in golden/manifest.json"));
        }
    }
    assert!(
        problems.is_empty(),
        "golden/ does not match its manifest:\n  {}\nRegenerate with `ci/regenerate-golden` (check with `ci/regenerate-golden --check`).",
        problems.join("\n  ")
    );
}

#[test]
fn golden_tree_fits_the_budget() {
    // The tree travels to the GPU machine with the repository (64 MiB in all).
    let dir = golden_dir();
    let mut present = BTreeSet::new();
    files_under(&dir, &dir, &mut present);
    let total: u64 = present.iter().map(|rel| std::fs::metadata(dir.join(rel)).unwrap().len()).sum();
    assert!(total < 64 * 1000 * 1000, "golden/ holds {total} bytes, over the 64 MB budget");
}
