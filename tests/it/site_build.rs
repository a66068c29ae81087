//! The site's build (`--no-default-features`) carries none of the receiver: neither the
//! `usage-receiver` crate nor any package only it brings in (the PostgreSQL client and
//! pool, the dashboard's HTML templates, …). Read from `cargo tree`, so a dependency that
//! drags the receiver back into the agent fails here, not on a site.
//!
//! The check is shown able to fail: the packages only the receiver brings are computed
//! (its tree minus the site's) and must include the PostgreSQL client and `maud`; and the
//! default build, which carries the receiver for `usage-agent demo`, must still name it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// Packages the receiver brings that the site must never carry.
const RECEIVER_ONLY: &[&str] = &[
    "usage-receiver",
    "tokio-postgres",
    "deadpool-postgres",
    "maud",
];

/// The package names in `cargo tree <args> -e normal --prefix none --offline`: the normal
/// (non-dev, non-build) dependencies, one per line as `name vX.Y.Z …`.
fn tree(args: &[&str]) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .arg("tree")
        .args(args)
        .args(["-e", "normal", "--prefix", "none", "--offline"])
        .output()
        .expect("run cargo tree");
    let stdout = String::from_utf8(output.stdout).expect("cargo tree writes UTF-8");
    assert!(
        output.status.success(),
        "cargo tree {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let packages: BTreeSet<String> = stdout
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let version = words.next()?;
            version
                .strip_prefix('v')
                .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
                .then(|| name.to_owned())
        })
        .collect();
    assert!(
        !packages.is_empty(),
        "cargo tree {args:?} listed no package:\n{stdout}"
    );
    packages
}

fn site_tree() -> BTreeSet<String> {
    tree(&["-p", "usage-agent", "--no-default-features"])
}

#[test]
fn the_site_build_carries_no_receiver_code_nor_postgresql_client() {
    let site = site_tree();
    assert!(
        site.contains("usage-agent"),
        "the site tree is the agent's: {site:?}"
    );
    let receiver = tree(&["-p", "usage-receiver"]);
    let receiver_only: BTreeSet<&String> = receiver.difference(&site).collect();
    for package in RECEIVER_ONLY {
        assert!(
            receiver.contains(*package),
            "the receiver brings {package} (else this check proves nothing): {receiver:?}"
        );
        assert!(
            !site.contains(*package),
            "the site build carries {package}, which only the receiver needs; \
             the packages only the receiver brings: {receiver_only:?}"
        );
        assert!(
            receiver_only.iter().any(|p| p == package),
            "{package} is among the packages only the receiver brings: {receiver_only:?}"
        );
    }
}

#[test]
fn the_default_build_carries_the_receiver_for_the_demo() {
    let default = tree(&["-p", "usage-agent"]);
    assert!(
        default.contains("usage-receiver"),
        "the default build (the `receiver` feature) links the receiver: {default:?}"
    );
    let site = site_tree();
    assert!(
        !site.contains("usage-receiver"),
        "without default features the receiver is gone: {site:?}"
    );
}
