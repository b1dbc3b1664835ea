//! What the CLI's benchmarks share.

use std::process::Command;

/// A whole process: wall seconds, peak RSS (MB), stdout.
pub struct Run {
    pub wall_s: f64,
    pub rss_mb: f64,
    pub stdout: String,
}

/// Runs `cmd` under `/usr/bin/time`, which reports wall time and the peak RSS.
pub fn timed(program: &str, args: &[String], env: &[(&str, String)]) -> Run {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "TIMED %e %M"])
        .arg(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("/usr/bin/time (Debian's `time` package)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?} failed:\n{stderr}");
    let line = stderr
        .lines()
        .rfind(|l| l.starts_with("TIMED "))
        .expect("time's line");
    let mut f = line.split_whitespace().skip(1);
    let wall_s: f64 = f.next().unwrap().parse().unwrap();
    let rss_kb: f64 = f.next().unwrap().parse().unwrap();
    Run {
        wall_s,
        rss_mb: rss_kb / 1024.0,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}
