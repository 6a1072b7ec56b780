//! The `keygen` binary: creates key files once, prints a host key's public half, names a bad
//! file.

use std::process::Command;

fn keygen(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keygen"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn keygen_creates_shows_and_names_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.key");
    let out = keygen(&[host.as_os_str()]);
    assert!(out.status.success());
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(public.len(), 64);
    assert!(String::from_utf8_lossy(&out.stderr).contains("created"));
    // Again: the same key, not a new one.
    let again = keygen(&[host.as_os_str()]);
    assert_eq!(String::from_utf8(again.stdout).unwrap().trim(), public);
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let shown = keygen(&["--public".as_ref(), host.as_os_str()]);
    assert_eq!(String::from_utf8(shown.stdout).unwrap().trim(), public);
    // A viewer secret, and a bad file.
    let secret = dir.path().join("viewers.key");
    assert!(keygen(&["--secret".as_ref(), secret.as_os_str()])
        .status
        .success());
    assert_eq!(std::fs::read_to_string(&secret).unwrap().trim().len(), 64);
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "nope").unwrap();
    let out = keygen(&["--public".as_ref(), bad.as_os_str()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.key") && err.contains("64 hex digits"),
        "{err}"
    );
}
