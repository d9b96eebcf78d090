//! The python `etcd3` client from PyPI passes our test file (tests/python/test_etcd3.py):
//! watch, watch_prefix, cancel, leases and their keys, locks and transactions.
//! tests/run.sh makes the virtualenv and points MESHKV_PYTHON at it.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_python_etcd3_client_passes_its_tests() {
    let python = std::env::var("MESHKV_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/meshkv/py/bin/python")
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "no python with etcd3 at {python}: run the suite through tests/run.sh, which installs it"
    );
    let dir = tempdir();
    let server = start_meshkv(&dir.path().join("data"), &[]);
    let (host, port) = server.client_addr.rsplit_once(':').unwrap();
    let out = Command::new(&python)
        .arg(repo_path("tests/python/test_etcd3.py"))
        .env("MESHKV_HOST", host)
        .env("MESHKV_PORT", port)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Ran 9 tests") && text.trim_end().ends_with("OK"), "{text}");
}
