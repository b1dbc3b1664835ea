//! Extraction throughput (MB/s) on a generated ~5 MB corpus of regulation documents, against
//! the naive approach (two regexes in Python, `tools/naive_extract.py`) over the same files in
//! the same run.
//!
//! Run: `cargo bench -p inspector-rules --bench extract` (needs `python3` on PATH).

use std::{path::Path, process::Command, time::Instant};

use inspector_rules::{Categorizer, extract_bytes};

const TARGET_BYTES: usize = 5 * 1024 * 1024;

fn chinese(n: u32) -> String {
    const D: [char; 10] = ['零', '一', '二', '三', '四', '五', '六', '七', '八', '九'];
    let (h, t, o) = (n / 100, n / 10 % 10, n % 10);
    let mut s = String::new();
    if h > 0 {
        s.push(D[h as usize]);
        s.push('百');
    }
    if t > 0 {
        if !(h == 0 && t == 1) {
            s.push(D[t as usize]);
        }
        s.push('十');
    } else if h > 0 && o > 0 {
        s.push('零');
    }
    if o > 0 {
        s.push(D[o as usize]);
    }
    s
}

const SENTENCES: &[&str] = &[
    "进入作业区域必须佩戴安全帽，并系好下颏带。",
    "在车间内作业或通行的人员必须穿着反光背心。",
    "搬运重物时应屈膝下蹲、保持腰背挺直，禁止弯腰搬运。",
    "通道内禁止堆放工具、物料和杂物，作业结束后应立即清理。",
    "配电柜作业必须执行停电、上锁挂牌，未经验电确认无电不得开始作业。",
    "安全出口、消防器材前禁止堆放物品，任何时候均应保持畅通。",
    "车间内禁止吸烟和使用明火，动火作业应办理动火审批手续。",
    "高处作业必须系挂安全带，安全带应高挂低用，挂点应牢固可靠。",
    "发生事故后应立即报告并组织救援，保护好事故现场。",
    "设备运转过程中，严禁跨越、清扫、调整或维修运动部件。",
];

/// One generated document: chapters, articles in Chinese numerals, sub-clauses, list items.
fn document(index: usize) -> String {
    let mut s = format!("# 《生产安全规程第{index}号》\n\n本规程依据国家有关法律法规制定。\n\n");
    let mut k = index;
    for n in 1..=200u32 {
        if n % 20 == 1 {
            s.push_str(&format!(
                "## 第{}章 第{}部分\n\n",
                chinese(n / 20 + 1),
                n / 20 + 1
            ));
        }
        k = k.wrapping_mul(31).wrapping_add(7);
        s.push_str(&format!(
            "第{}条 {}{}\n",
            chinese(n),
            SENTENCES[k % 10],
            SENTENCES[(k / 10) % 10]
        ));
        if n % 3 == 0 {
            for sub in 1..=2 {
                s.push_str(&format!("{n}.{sub} {}\n", SENTENCES[(k + sub) % 10]));
            }
        }
        if n % 7 == 0 {
            s.push_str(&format!(
                "（一）{}\n（二）{}\n",
                SENTENCES[(k + 3) % 10],
                SENTENCES[(k + 4) % 10]
            ));
        }
        s.push('\n');
    }
    s
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut total = 0;
    let mut files = Vec::new();
    let mut i = 0;
    while total < TARGET_BYTES {
        let text = document(i);
        let path = dir.path().join(format!("doc-{i:04}.md"));
        std::fs::write(&path, &text).unwrap();
        total += text.len();
        files.push(path);
        i += 1;
    }
    println!(
        "corpus: {} files, {:.2} MB",
        files.len(),
        total as f64 / 1e6
    );

    let categorizer = Categorizer::default();
    // Best of 5 for both sides: this machine is shared and noisy.
    let mut ours = f64::INFINITY;
    let mut rules = 0;
    for _ in 0..5 {
        let start = Instant::now();
        rules = 0;
        for path in &files {
            let bytes = std::fs::read(path).unwrap();
            let doc = extract_bytes(path.to_str().unwrap(), &bytes, &categorizer).unwrap();
            rules += doc.rules.len();
        }
        ours = ours.min(start.elapsed().as_secs_f64());
    }
    let mut naive = f64::INFINITY;
    let mut matches = 0;
    for _ in 0..5 {
        let (s, m) = run_naive(dir.path());
        naive = naive.min(s);
        matches = m;
    }
    let mb = total as f64 / 1e6;
    println!(
        "inspector rules extract (parse + categorise): {:8.2} MB/s  ({rules} rules)",
        mb / ours
    );
    println!(
        "naive two-regex Python:                      {:8.2} MB/s  ({matches} matches)",
        mb / naive
    );
    println!("ratio inspector/naive: {:.2}", naive / ours);
}

fn run_naive(dir: &Path) -> (f64, u64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/naive_extract.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dir)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let seconds = field(&line, "seconds");
    let matches = field(&line, "matches") as u64;
    (seconds, matches)
}

/// Reads a number from the one-line JSON the script prints.
fn field(json: &str, name: &str) -> f64 {
    let key = format!("\"{name}\": ");
    let start = json.find(&key).expect("field present") + key.len();
    json[start..]
        .split([',', '}'])
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
