//! Fuzzing on stable Rust: every reader of outside input, fed mutated inputs for a given time.
//!
//!     cargo run --release --features cuda --example fuzz -- TARGET [--seconds S] [--seed N]
//!     scripts/fuzz [SECONDS]          (every target, each for SECONDS, under a 256 MiB limit)
//!
//! Not coverage-guided (that needs nightly or an instrumented build): inputs are the committed
//! corpus (`fuzz/corpus/TARGET/`, seeded with valid files made here) mutated at random: bit
//! flips, bytes and 32-bit integers set to edge values (0, 1, 0x7fffffff, 0xffffffff, ...),
//! ranges deleted, repeated or cut, inputs spliced. What stands in for coverage is the outcome: an
//! input whose result (accepted, or its error message with the numbers taken out) has not been
//! seen before is kept in the corpus. A panic saves the input to `fuzz/crashes/` and fails the
//! run; an input that takes longer than 5 s is a hang and aborts it.

use dcl::arch::ModelName;
use dcl::data::{cifar, idx, npy};
use dcl::safetensors::{parse_safetensors, safetensors_bytes, NamedTensor};
use dcl::train::RunConfig;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One fuzz target: what it reads, and the valid inputs its corpus starts from.
struct Target {
    name: &'static str,
    run: fn(&[u8]) -> Result<(), String>,
    seeds: fn() -> Vec<Vec<u8>>,
}

const TARGETS: &[Target] = &[
    Target {
        name: "cifar-batch",
        run: |b| {
            cifar::from_file("data_batch_1.bin", b.to_vec())
                .map(drop)
                .map_err(|e| e.to_string())
        },
        seeds: || vec![cifar_records(3)],
    },
    Target {
        name: "cifar-archive",
        run: |b| {
            cifar::from_archive("cifar-10-binary.tar.gz", b)
                .map(drop)
                .map_err(|e| e.to_string())
        },
        seeds: || vec![cifar_archive(true), cifar_archive(false)],
    },
    Target {
        name: "idx",
        run: |b| {
            idx::parse("train-images-idx3-ubyte", b)
                .map(drop)
                .map_err(|e| e.to_string())
        },
        seeds: || {
            let raw = idx_bytes(&[2, 3, 3], &[7; 18]);
            vec![gzip(&raw), raw]
        },
    },
    Target {
        name: "npy",
        run: |b| npy::parse(b).map(drop),
        seeds: || vec![npy::to_bytes(&[2, 3], &[0.5, -1.0, 2.0, 0.0, 1e-3, 7.0])],
    },
    Target {
        name: "safetensors",
        run: |b| {
            parse_safetensors("model.safetensors", b)
                .map(drop)
                .map_err(|e| e.to_string())
        },
        seeds: || {
            let tensors = [NamedTensor {
                name: "conv1.weight".into(),
                shape: vec![2, 1, 1, 2],
                data: vec![0.5, -0.5, 1.0, 2.0],
            }];
            vec![safetensors_bytes(&tensors, ModelName::ResNetMini)]
        },
    },
    Target {
        name: "config-toml",
        run: |b| {
            let text = String::from_utf8_lossy(b);
            RunConfig::from_toml(&text, "config.toml")
                .map(drop)
                .map_err(|e| e.to_string())
        },
        seeds: || vec![RunConfig::default().to_toml().unwrap().into_bytes()],
    },
    Target {
        name: "page-config",
        run: |b| {
            let value: serde_json::Value = serde_json::from_slice(b).map_err(|e| e.to_string())?;
            RunConfig::playground()
                .overridden(&value)
                .map(drop)
                .map_err(|e| e.to_string())
        },
        seeds: || {
            let json = r#"{"batchSize": 16, "subset": 480, "evalImages": 200, "loss": "dclw", "temperature": 0.2}"#;
            vec![json.as_bytes().to_vec()]
        },
    },
    Target {
        name: "serve-request",
        run: |b| {
            dcl::cli::serve::read_request(&mut std::io::BufReader::new(b))
                .map(drop)
                .map_err(String::from)
        },
        seeds: || {
            vec![b"GET /www/app.js?v=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n".to_vec()]
        },
    },
];

fn cifar_records(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            std::iter::once(i as u8 % 10).chain((0..3072).map(move |p| (p * 7 + i) as u8))
        })
        .collect()
}

fn cifar_archive(compressed: bool) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for name in ["data_batch_1.bin", "test_batch.bin"] {
        let bytes = cifar_records(2);
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("cifar-10-batches-bin/{name}"),
            bytes.as_slice(),
        )
        .unwrap();
    }
    let tar = tar.into_inner().unwrap();
    if compressed {
        gzip(&tar)
    } else {
        tar
    }
}

fn idx_bytes(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut raw = vec![0, 0, 8, dims.len() as u8];
    raw.extend(dims.iter().flat_map(|d| d.to_be_bytes()));
    raw.extend(payload);
    raw
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

const EDGE_U32: [u32; 8] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x0100_0000,
];
const EDGE_U8: [u8; 5] = [0, 1, 0x7f, 0x80, 0xff];

/// One to four random edits of `input`, sometimes spliced with `other`.
fn mutate(rng: &mut impl Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let len = out.len();
        let at = if len == 0 { 0 } else { rng.gen_range(0..len) };
        match rng.gen_range(0..9) {
            0 if len > 0 => out[at] ^= 1 << rng.gen_range(0..8),
            1 if len > 0 => out[at] = EDGE_U8[rng.gen_range(0..EDGE_U8.len())],
            2 if len >= 4 => {
                let at = rng.gen_range(0..=len - 4);
                let v = EDGE_U32[rng.gen_range(0..EDGE_U32.len())];
                let bytes = if rng.gen() {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                out[at..at + 4].copy_from_slice(&bytes);
            }
            3 => {
                let n = rng.gen_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                out.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let end = rng.gen_range(at..=len.min(at + 64));
                out.drain(at..end);
            }
            5 if len > 0 => {
                let end = rng.gen_range(at..=len.min(at + 64));
                let piece = out[at..end].to_vec();
                out.splice(at..at, piece);
            }
            6 => out.truncate(at),
            7 if !other.is_empty() => {
                let from = rng.gen_range(0..other.len());
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => out[at] = rng.gen(),
            _ => out.push(rng.gen()),
        }
    }
    out
}

/// The outcome in a coarse form: the novelty signal that decides what the corpus keeps. Only an
/// error's first line counts, up to its first quote (quotes echo the input), without digits, cut
/// at 48 characters; otherwise every input would look new.
fn outcome_class(result: &Result<(), String>) -> String {
    let Err(e) = result else {
        return "ok".into();
    };
    let line = e.lines().next().unwrap_or("");
    let unquoted = line.split(['"', '\'', '`']).next().unwrap_or("");
    unquoted
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(48)
        .collect()
}

fn load_corpus(dir: &Path, target: &Target) -> Vec<Vec<u8>> {
    let mut corpus = (target.seeds)();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut files: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        files.sort();
        corpus.extend(files.iter().filter_map(|f| std::fs::read(f).ok()));
    }
    corpus
}

fn hex_name(bytes: &[u8]) -> String {
    format!("{:08x}-{}", crc32fast::hash(bytes), bytes.len())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    let Some(target) = args
        .first()
        .and_then(|n| TARGETS.iter().find(|t| t.name == n))
    else {
        anyhow::bail!(
            "usage: fuzz TARGET [--seconds S] [--seed N]; targets: {}",
            names.join(", ")
        );
    };
    let seconds: f64 = flag("--seconds").map_or(Ok(30.0), |s| s.parse())?;
    let seed: u64 = flag("--seed").map_or(Ok(0), |s| s.parse())?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus_dir = root.join("corpus").join(target.name);
    std::fs::create_dir_all(&corpus_dir)?;
    let mut corpus = load_corpus(&corpus_dir, target);
    let mut seen: HashSet<String> = corpus
        .iter()
        .map(|c| outcome_class(&(target.run)(c)))
        .collect();

    // A panic is caught per input and reported; the hook stays quiet meanwhile.
    std::panic::set_hook(Box::new(|_| {}));
    let current = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let watchdog = current.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        if watchdog.lock().unwrap().elapsed() > Duration::from_secs(5) {
            eprintln!("HANG: one input ran for more than 5 s");
            std::process::exit(3);
        }
    });

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (start, mut runs, mut crashes, mut slowest) = (Instant::now(), 0u64, 0u64, Duration::ZERO);
    while start.elapsed().as_secs_f64() < seconds {
        let a = &corpus[rng.gen_range(0..corpus.len())];
        let b = &corpus[rng.gen_range(0..corpus.len())];
        let input = mutate(&mut rng, a, b);
        *current.lock().unwrap() = Instant::now();
        let began = Instant::now();
        let result = std::panic::catch_unwind(|| (target.run)(&input));
        slowest = slowest.max(began.elapsed());
        runs += 1;
        match result {
            Ok(result) => {
                if seen.insert(outcome_class(&result)) {
                    std::fs::write(corpus_dir.join(hex_name(&input)), &input)?;
                    corpus.push(input);
                }
            }
            Err(_) => {
                crashes += 1;
                let dir = root.join("crashes");
                std::fs::create_dir_all(&dir)?;
                let path = dir.join(format!("{}-{}", target.name, hex_name(&input)));
                std::fs::write(&path, &input)?;
                eprintln!("PANIC on {}", path.display());
            }
        }
    }
    let peak_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    println!(
        "{}: {runs} inputs in {:.0} s, {crashes} panics, slowest {:.1} ms, corpus {} ({} outcomes), peak memory {} MiB",
        target.name,
        start.elapsed().as_secs_f64(),
        slowest.as_secs_f64() * 1e3,
        corpus.len(),
        seen.len(),
        peak_kib >> 10
    );
    anyhow::ensure!(
        crashes == 0,
        "{}: {crashes} inputs panicked (saved under fuzz/crashes/)",
        target.name
    );
    Ok(())
}
