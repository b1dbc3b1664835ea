//! One photo through Qwen2-VL-2B's shapes on the CPU, timed as whole processes from start to
//! the printed answer (model loading included), against transformers and llama.cpp measured in
//! the same run on the same machine, 2 threads each.
//!
//! The checkpoint has the 2B's config and random weights with a tokenizer trained here
//! (`inspector model init`, about 9 GB under `target/`); `inspector model quantize` writes its
//! q8_0 and q4k directories. Every side reads one 448×448 photo (256 image tokens) with the same
//! short prompt through the model's chat template and generates exactly 64 greedy tokens.
//!
//! - ours: `inspector chat --json` on the f32, q8_0 and q4k directories (its JSON has the load,
//!   prefill and decode phases);
//! - transformers fp32 with sdpa attention (`tools/bench_chat_transformers.py`, `min_new_tokens`
//!   forcing 64), when `INSPECTOR_PYTHON` names a Python with torch and transformers;
//! - llama.cpp (`tools/bench/llamacpp.sh`: text model Q8_0 and Q4_K_S, vision projector q8_0 on
//!   both sides of the comparison), when `LLAMACPP_DIR` names a built llama.cpp source tree and
//!   `LLAMACPP_PYTHON` a Python for its converter (`LLAMACPP_BIN` names another build folder's
//!   binaries). A llama.cpp that fails is reported and the other sides still print.
//!
//! Run: `INSPECTOR_PYTHON=~/venv/bin/python LLAMACPP_DIR=… LLAMACPP_PYTHON=… cargo bench -p
//! inspector-cli --bench cpu_inference` on an otherwise idle machine (needs `/usr/bin/time`,
//! Debian's `time`). `BENCH_SIDES=ours` (or a comma list of ours, transformers, llamacpp)
//! limits the sides. The sides the targets compare (transformers, our f32, q8_0 and q4k) run in
//! `BENCH_ROUNDS` alternating rounds (default 3) and report their medians; q8_0 without AMX and
//! llama.cpp run once. Before each run the page cache holds that side's model files, read once
//! untimed, and none of the other sides' (`page_cache_for`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const NEW_TOKENS: usize = 64;
const THREADS: usize = 2;
const PROMPT: &str = "你是工厂安全巡检员。请检查这张现场照片，找出其中违反安全规章制度的行为，对每一处违规说明违反的条款、风险等级、整改建议和位置。只输出一个JSON对象。";

mod common;
use common::timed;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn inspector() -> Command {
    Command::new(env!("CARGO_BIN_EXE_inspector"))
}

fn json_line(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rfind(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in {stdout}"));
    serde_json::from_str(line).unwrap()
}

/// The 2B-shaped checkpoint and its quantized directories, made once.
fn models(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let f32_dir = dir.join("f32");
    if !f32_dir.join("tokenizer.json").exists() {
        let _ = std::fs::remove_dir_all(&f32_dir);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("2b.json"),
            inspector_qwen2vl::init::QWEN2_VL_2B_CONFIG,
        )
        .unwrap();
        let mut corpus = String::new();
        for f in ["electrical-safety.utf8.md", "site-management.utf8.txt"] {
            corpus.push_str(
                &std::fs::read_to_string(root().join("crates/rules/tests/data").join(f)).unwrap(),
            );
        }
        corpus.push_str(PROMPT);
        std::fs::write(dir.join("corpus.txt"), corpus).unwrap();
        let o = inspector()
            .args(["model", "init", "--config"])
            .arg(dir.join("2b.json"))
            .arg("--tokenizer-corpus")
            .arg(dir.join("corpus.txt"))
            .arg("--out")
            .arg(&f32_dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        println!("made the 2B-shaped checkpoint in {}", f32_dir.display());
    }
    let quantized = |format: &str| {
        let out = dir.join(format);
        if !out.join("inspector_quant.json").exists() {
            let _ = std::fs::remove_dir_all(&out);
            let o = inspector()
                .args(["model", "quantize", "--model"])
                .arg(&f32_dir)
                .args(["--format", format, "--out"])
                .arg(&out)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            print!("{}", String::from_utf8_lossy(&o.stdout));
        }
        out
    };
    let q8 = quantized("q8_0");
    let q4 = quantized("q4k");
    (f32_dir, q8, q4)
}

fn photo(dir: &Path) -> PathBuf {
    let path = dir.join("photo-448.png");
    if !path.exists() {
        let img = image::RgbImage::from_fn(448, 448, |x, y| {
            image::Rgb([
                (x / 2) as u8,
                (y / 2) as u8,
                (((x + y) / 7) % 2 * 200) as u8,
            ])
        });
        img.save(&path).unwrap();
    }
    path
}

/// One side's figures.
#[derive(Debug, Default, Clone)]
struct Side {
    name: String,
    wall_s: f64,
    rss_mb: f64,
    prefill_s: Option<f64>,
    decode_tok_s: f64,
    /// How many runs the figures are the medians of.
    rounds: usize,
}

fn ours(model: &Path, photo: &Path, name: &str, env: &[(&str, String)]) -> Side {
    let s = |p: &Path| p.display().to_string();
    let args: Vec<String> = [
        "chat",
        "--model",
        &s(model),
        "--image",
        &s(photo),
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-new-tokens",
        &NEW_TOKENS.to_string(),
        "--max-pixels",
        &(448 * 448).to_string(),
        "--threads",
        &THREADS.to_string(),
        "--json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let run = timed(env!("CARGO_BIN_EXE_inspector"), &args, env);
    let v = json_line(&run.stdout);
    assert_eq!(
        v["token_ids"].as_array().unwrap().len(),
        NEW_TOKENS,
        "{name}: stopped early: {v}"
    );
    let t = &v["timings"];
    println!(
        "  {name}: {} prompt tokens; load {:.2}s, prefill {:.2}s, decode {:.1} tok/s",
        v["prompt_tokens"],
        t["load_s"],
        t["prefill_s"].as_f64().unwrap(),
        t["decode_tokens_per_s"].as_f64().unwrap()
    );
    Side {
        name: name.into(),
        wall_s: run.wall_s,
        rss_mb: run.rss_mb,
        prefill_s: t["prefill_s"].as_f64(),
        decode_tok_s: t["decode_tokens_per_s"].as_f64().unwrap(),
        rounds: 1,
    }
}

fn transformers(python: &str, model: &Path, photo: &Path) -> Side {
    let script = root().join("tools/bench_chat_transformers.py");
    let args: Vec<String> = vec![
        script.display().to_string(),
        THREADS.to_string(),
        model.display().to_string(),
        photo.display().to_string(),
        PROMPT.into(),
        NEW_TOKENS.to_string(),
    ];
    let run = timed(python, &args, &[("OMP_NUM_THREADS", THREADS.to_string())]);
    let v = json_line(&run.stdout);
    println!(
        "  transformers fp32: {} prompt tokens; load {:.2}s, prefill {:.2}s, decode {:.2} tok/s (torch {})",
        v["prompt_tokens"],
        v["load_s"].as_f64().unwrap(),
        v["prefill_s"].as_f64().unwrap(),
        v["decode_tokens_per_s"].as_f64().unwrap(),
        v["torch"]
    );
    Side {
        name: "transformers fp32 (sdpa)".into(),
        wall_s: run.wall_s,
        rss_mb: run.rss_mb,
        prefill_s: v["prefill_s"].as_f64(),
        decode_tok_s: v["decode_tokens_per_s"].as_f64().unwrap(),
        rounds: 1,
    }
}

fn llamacpp(llama: &str, python: &str, model: &Path, photo: &Path, work: &Path) -> Vec<Side> {
    let out = Command::new("bash")
        .arg(root().join("tools/bench/llamacpp.sh"))
        .arg(model)
        .arg(photo)
        .arg(PROMPT)
        .env("LLAMACPP_DIR", llama)
        .env("PYTHON", python)
        .env("N", NEW_TOKENS.to_string())
        .env("THREADS", THREADS.to_string())
        .env("WORK_DIR", work)
        .env("CONFIGS", "Q8_0:q8_0 Q4_K_S:q8_0")
        .output()
        .unwrap();
    if !out.status.success() {
        // The other sides' figures still print; the failure is named, not hidden.
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        println!("  llama.cpp: FAILED (tools/bench/llamacpp.sh), its last lines:");
        for l in tail.iter().rev() {
            println!("    {l}");
        }
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            println!(
                "  llama.cpp {}: image encode {} ms, prompt {:.1} tok/s, decode {:.1} tok/s",
                v["config"],
                v["image_encode_ms"],
                v["prompt_tok_s"].as_f64().unwrap(),
                v["decode_tok_s"].as_f64().unwrap()
            );
            Side {
                name: format!("llama.cpp {}", v["config"].as_str().unwrap()),
                wall_s: v["wall_s"].as_f64().unwrap(),
                rss_mb: v["peak_rss_mb"].as_f64().unwrap(),
                prefill_s: None,
                decode_tok_s: v["decode_tok_s"].as_f64().unwrap(),
                rounds: 1,
            }
        })
        .collect()
}

/// The same page cache for every side: the other sides' model files are dropped from it
/// (`posix_fadvise(DONTNEED)`), so that they take no memory this side's process would have to
/// reclaim, and this side's files (`own`, if any) are read into it once, untimed. (Without
/// this, transformers' 9 GB of weights left in the cache made the next side's load reclaim
/// memory: our q8_0 load took 4–5 s after it against 1.1 s otherwise.)
fn page_cache_for(own: Option<&Path>, all: &[&Path]) {
    for dir in all {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if !path.is_file() {
                continue;
            }
            let mut f = std::fs::File::open(&path).unwrap();
            if own == Some(*dir) {
                std::io::copy(&mut f, &mut std::io::sink()).unwrap();
            } else {
                use std::os::fd::AsRawFd;
                // SAFETY: an advisory call on an open file descriptor.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
        }
    }
}

/// A side's figures over its rounds: the median of each (the largest peak RSS).
fn median(runs: &[Side]) -> Side {
    let mid = |f: &dyn Fn(&Side) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let prefill = runs.iter().all(|r| r.prefill_s.is_some());
    Side {
        name: runs[0].name.clone(),
        wall_s: mid(&|r| r.wall_s),
        rss_mb: runs.iter().map(|r| r.rss_mb).fold(0.0, f64::max),
        prefill_s: prefill.then(|| mid(&|r| r.prefill_s.unwrap())),
        decode_tok_s: mid(&|r| r.decode_tok_s),
        rounds: runs.len(),
    }
}

/// Whether this core has AMX-int8 (Linux names it in /proc/cpuinfo).
fn has_amx() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" amx_int8"))
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cpu-inference-2b");
    let sides_env =
        std::env::var("BENCH_SIDES").unwrap_or_else(|_| "ours,transformers,llamacpp".into());
    let wants = |s: &str| sides_env.split(',').any(|x| x.trim() == s);
    let (f32_dir, q8, q4) = models(&dir);
    let photo = photo(&dir);
    println!(
        "one 448×448 photo, {NEW_TOKENS} greedy new tokens, {THREADS} threads, whole processes:"
    );
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut sides: Vec<Side> = Vec::new();
    let llama_files = dir.join("llamacpp");
    let mut all: Vec<&Path> = vec![&f32_dir, &q8, &q4];
    if llama_files.is_dir() {
        all.push(&llama_files);
    }
    let python = std::env::var("INSPECTOR_PYTHON").ok();
    if python.is_none() && wants("transformers") {
        println!("  transformers: skipped (set INSPECTOR_PYTHON)");
    }
    // The sides the targets compare run in alternating rounds (transformers, q8_0, q4k, …), so
    // that the machine's drift (the memory bandwidth a shared VM gets varies by a fifth within
    // an hour) falls on every side alike; each side's figures are the medians of its rounds.
    // runs[0]: transformers; 1, 2, 3: our f32, q8_0 and q4k.
    let mut runs: Vec<Vec<Side>> = vec![Vec::new(); 4];
    for round in 1..=rounds {
        println!("round {round} of {rounds}:");
        if wants("transformers")
            && let Some(p) = &python
        {
            page_cache_for(Some(&f32_dir), &all);
            runs[0].push(transformers(p, &f32_dir, &photo));
        }
        if wants("ours") {
            for (i, (model, name)) in [
                (&f32_dir, "inspector f32"),
                (&q8, "inspector q8_0"),
                (&q4, "inspector q4k"),
            ]
            .into_iter()
            .enumerate()
            {
                page_cache_for(Some(model), &all);
                runs[i + 1].push(ours(model, &photo, name, &[]));
            }
        }
    }
    sides.extend(runs.iter().filter(|r| !r.is_empty()).map(|r| median(r)));
    if wants("ours") {
        println!("once:");
        // On an AMX core, q8_0 prefill runs on AMX; the same run on the VNNI kernels alone
        // (what AVX-512 cores without AMX run) shows what AMX adds.
        if has_amx() {
            page_cache_for(Some(&q8), &all);
            sides.push(ours(
                &q8,
                &photo,
                "inspector q8_0 without AMX",
                &[("MISTRALRS_NO_AMX", "1".into())],
            ));
        }
    }
    if wants("llamacpp") {
        match (
            std::env::var("LLAMACPP_DIR"),
            std::env::var("LLAMACPP_PYTHON"),
        ) {
            (Ok(l), Ok(p)) => {
                // Its script converts from the f32 checkpoint once, then reads its own files.
                let own = llama_files.is_dir().then_some(llama_files.as_path());
                page_cache_for(own, &all);
                sides.extend(llamacpp(&l, &p, &f32_dir, &photo, &dir.join("llamacpp")))
            }
            _ => println!("  llama.cpp: skipped (set LLAMACPP_DIR and LLAMACPP_PYTHON)"),
        }
    }
    println!();
    println!("| side | runs | whole process s | peak RSS GB | prefill s | decode tok/s |");
    println!("|---|---|---|---|---|---|");
    for s in &sides {
        println!(
            "| {} | {} | {:.2} | {:.2} | {} | {:.2} |",
            s.name,
            if s.rounds > 1 {
                format!("median of {}", s.rounds)
            } else {
                "1".into()
            },
            s.wall_s,
            s.rss_mb / 1024.0,
            s.prefill_s.map_or("—".into(), |p| format!("{p:.2}")),
            s.decode_tok_s
        );
    }
    let find = |n: &str| sides.iter().find(|s| s.name.starts_with(n));
    println!();
    if let (Some(t), Some(q8), Some(q4), Some(f)) = (
        find("transformers"),
        find("inspector q8_0"),
        find("inspector q4k"),
        find("inspector f32"),
    ) {
        println!(
            "q8_0 whole process vs transformers fp32: {:.2}× faster (must ≥ 3)",
            t.wall_s / q8.wall_s
        );
        println!(
            "q4k decode vs transformers fp32 decode: {:.2}× (must ≥ 4)",
            q4.decode_tok_s / t.decode_tok_s
        );
        println!(
            "f32 prefill vs transformers fp32 prefill: {:.2}× (must ≥ 1.0)",
            t.prefill_s.unwrap() / f.prefill_s.unwrap()
        );
        println!(
            "f32 whole process vs transformers fp32: {:.2}×",
            t.wall_s / f.wall_s
        );
    }
    if let (Some(amx), Some(vnni)) = (find("inspector q8_0"), find("inspector q8_0 without AMX")) {
        println!(
            "q8_0 on AMX vs on the VNNI kernels alone: prefill {:.2}×, whole process {:.2}×",
            vnni.prefill_s.unwrap() / amx.prefill_s.unwrap(),
            vnni.wall_s / amx.wall_s
        );
    }
    for (ours_name, theirs) in [
        ("inspector q8_0", "llama.cpp text-Q8_0"),
        ("inspector q4k", "llama.cpp text-Q4_K_S"),
    ] {
        if let (Some(o), Some(l)) = (find(ours_name), find(theirs)) {
            println!(
                "{ours_name} vs {}: whole process {:.2}× faster, decode {:.2}×, peak RSS {:.2}×",
                l.name,
                l.wall_s / o.wall_s,
                o.decode_tok_s / l.decode_tok_s,
                o.rss_mb / l.rss_mb
            );
        }
    }
    for (name, limit) in [("inspector q8_0", 3.5), ("inspector q4k", 2.5)] {
        if let Some(s) = find(name) {
            println!(
                "{name} peak RSS {:.2} GB (must ≤ {limit})",
                s.rss_mb / 1024.0
            );
        }
    }
}
