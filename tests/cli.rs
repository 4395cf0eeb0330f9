//! The `dcl` binary: numerics for porters (`dcl loss`), data inspection, and clear errors.
//! One file for every subcommand's tests (over 500 lines): they share the binary's helpers.

use crate::common::*;
use dcl::data::npy;
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

fn dcl(args: &[&str]) -> Output {
    Command::new(dcl_bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    std::fs::write(path, npy::to_bytes(shape, data)).unwrap();
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn loss_command_matches_lightly_with_gradients() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/lightly_losses.json"
    ))
    .unwrap();
    let fixtures: Value = serde_json::from_str(&text).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for case in fixtures["cases"].as_array().unwrap().iter().step_by(3) {
        let (n, d) = (
            case["n"].as_u64().unwrap() as usize,
            case["d"].as_u64().unwrap() as usize,
        );
        let (a, b) = (tmp.path().join("a.npy"), tmp.path().join("b.npy"));
        write_npy(&a, &[n, d], &floats(&case["z1"]));
        write_npy(&b, &[n, d], &floats(&case["z2"]));
        let grads = tmp.path().join("grads");
        let out = dcl(&[
            "loss",
            "--z1",
            a.to_str().unwrap(),
            "--z2",
            b.to_str().unwrap(),
            "--kind",
            case["kind"].as_str().unwrap(),
            "--temperature",
            &case["temperature"].to_string(),
            "--sigma",
            &case["sigma"].to_string(),
            "--grad-out",
            grads.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["kind"], case["kind"]);
        assert_eq!(
            (report["n"].as_u64(), report["d"].as_u64()),
            (Some(n as u64), Some(d as u64))
        );
        let (ours, theirs) = (
            report["loss"].as_f64().unwrap(),
            case["loss"].as_f64().unwrap(),
        );
        assert!(
            (ours - theirs).abs() / theirs.abs() < 1e-5,
            "{ours} vs {theirs}"
        );
        for (file, key) in [("grad_z1.npy", "grad_z1"), ("grad_z2.npy", "grad_z2")] {
            let g = npy::parse(&std::fs::read(grads.join(file)).unwrap()).unwrap();
            assert_eq!(g.shape, vec![n, d]);
            let expected = floats(&case[key]);
            let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in g.data.iter().zip(&expected) {
                assert!((*x as f32 - y).abs() <= 1e-5 * scale, "{file}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn loss_command_rejects_bad_inputs_with_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    write_npy(Path::new(&p("a.npy")), &[4, 3], &[0.5; 12]);
    write_npy(Path::new(&p("b.npy")), &[4, 2], &[0.5; 8]);
    write_npy(Path::new(&p("one.npy")), &[1, 3], &[0.5; 3]);
    let mut nan = vec![0.5; 12];
    nan[7] = f32::NAN;
    write_npy(Path::new(&p("nan.npy")), &[4, 3], &nan);
    std::fs::write(p("junk.npy"), b"\x93NUMPY\x01\x00garbage").unwrap();
    let cases: [(&str, &str, &str); 5] = [
        ("a.npy", "b.npy", "b.npy has [4, 2]"),
        ("one.npy", "one.npy", "N >= 2"),
        (
            "nan.npy",
            "a.npy",
            "nan.npy: non-finite value NaN at flat index 7",
        ),
        ("junk.npy", "a.npy", "junk.npy"),
        ("missing.npy", "a.npy", "missing.npy: cannot read"),
    ];
    for (z1, z2, needle) in cases {
        let out = dcl(&["loss", "--z1", &p(z1), "--z2", &p(z2)]);
        assert_eq!(out.status.code(), Some(2), "{z1} {z2}");
        let err = stderr(&out);
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let out = dcl(&[
        "loss",
        "--z1",
        &p("a.npy"),
        "--z2",
        &p("a.npy"),
        "--temperature",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("temperature 0 must be"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_flags_are_named() {
    let out = dcl(&["pretrain", "--device", "tpu", "--out", "/tmp/never"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown device 'tpu'"),
        "{}",
        stderr(&out)
    );
    let out = dcl(&["model", "info", "resnet-huge"]);
    assert!(
        stderr(&out).contains("unknown model 'resnet-huge'"),
        "{}",
        stderr(&out)
    );
    let out = dcl(&["data", "info", "no-such-dataset"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no-such-dataset"), "{}", stderr(&out));
}

#[test]
fn model_info_counts_like_torchvision() {
    let out = dcl(&["model", "info", "resnet18"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    // torchvision resnet18 minus fc (11,176,512) with the 3x3 CIFAR stem instead of 7x7.
    assert_eq!(info["params"]["backbone"], 11_168_832);
    assert_eq!(info["params"]["feature_dim"], 512);
    // Linear(512, 512, no bias) + BN(512) + Linear(512, 128).
    assert_eq!(
        info["params"]["head"],
        512 * 512 + 2 * 512 + 512 * 128 + 128
    );
    let out = dcl(&["model", "info", "resnet-mini"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["params"]["feature_dim"], 128);
    assert!(info["params"]["backbone"].as_u64().unwrap() < 400_000);
}

#[test]
fn data_info_and_pixel_exact_preview() {
    let tmp = tempfile::tempdir().unwrap();
    let root = write_cifar10(tmp.path(), 2, 10, 5);
    let out = dcl(&["data", "info", root.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["format"], "cifar10");
    assert_eq!(info["images"], 25);
    assert_eq!(info["shape"], serde_json::json!([3, 32, 32]));
    assert_eq!(info["classes"], 10);
    assert_eq!(info["label_counts"].as_array().unwrap().len(), 10);

    let png_path = tmp.path().join("first.png");
    let out = dcl(&[
        "data",
        "preview",
        root.to_str().unwrap(),
        "--out",
        png_path.to_str().unwrap(),
        "--count",
        "1",
        "--scale",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let decoder = png::Decoder::new(std::fs::File::open(&png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!((frame.width, frame.height), (32, 32));
    let record = cifar10_record(0, 0);
    for y in 0..32 {
        for x in 0..32 {
            for c in 0..3 {
                assert_eq!(buf[(y * 32 + x) * 3 + c], record[1 + c * 1024 + y * 32 + x]);
            }
        }
    }
    let grid = tmp.path().join("views.png");
    let out = dcl(&[
        "data",
        "preview",
        root.to_str().unwrap(),
        "--out",
        grid.to_str().unwrap(),
        "--count",
        "4",
        "--views",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reader = png::Decoder::new(std::fs::File::open(&grid).unwrap())
        .read_info()
        .unwrap();
    // Two columns of items, two views each, at scale 2 with 2-pixel gaps.
    assert_eq!(reader.info().width, 4 * 64 + 3 * 2);
}

#[test]
fn data_get_without_internet_says_how_to_place_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dcl(&[
        "data",
        "get",
        "cifar10",
        "--dir",
        tmp.path().to_str().unwrap(),
    ]);
    if out.status.success() {
        // Online: the archive arrived, passed its checksum, and reads as CIFAR-10.
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        let target = said.trim().rsplit(" is in ").next().unwrap();
        let info = dcl(&["data", "info", target, "--json"]);
        assert!(info.status.success(), "{}", stderr(&info));
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(
            (
                &info["train_images"],
                &info["test_images"],
                &info["classes"]
            ),
            (&50_000.into(), &10_000.into(), &10.into()),
            "{info}"
        );
        return;
    }
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("could not download") && err.contains("by hand"),
        "{err}"
    );
}

/// `cifar-10-binary.tar.gz` in the official layout, with `per_batch` images in each batch.
fn cifar10_archive(per_batch: usize) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("cifar-10-batches-bin/{name}"), bytes)
            .unwrap();
    };
    add("batches.meta.txt", b"airplane\nautomobile\n");
    let batch = |first: usize| -> Vec<u8> {
        (first..first + per_batch)
            .flat_map(|i| cifar10_record(i, (i % 10) as u8))
            .collect()
    };
    for b in 1..=5 {
        add(&format!("data_batch_{b}.bin"), &batch(b * per_batch));
    }
    add("test_batch.bin", &batch(0));
    tar.into_inner().unwrap().finish().unwrap()
}

/// Answers `bodies.len()` HTTP requests on loopback, the i-th with `bodies[i]` (`declared` bytes
/// promised; fewer sent is a connection cut short). Returns the URL it serves.
fn serve_once_each(bodies: Vec<(Vec<u8>, usize)>) -> String {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/cifar-10-binary.tar.gz",
        listener.local_addr().unwrap()
    );
    std::thread::spawn(move || {
        for (body, declared) in bodies {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    url
}

#[test]
fn data_get_fetches_verifies_and_refuses_bad_downloads() {
    let archive = cifar10_archive(4);
    let md5 = format!("{:x}", md5::compute(&archive));
    let mut flipped = archive.clone();
    flipped[archive.len() / 2] ^= 0x40;
    let short = archive[..archive.len() - 100].to_vec();
    let n = archive.len();
    let url = serve_once_each(vec![
        (flipped, n),
        (short.clone(), short.len()),
        (short, n),
        (archive.clone(), n),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let get = || {
        Command::new(dcl_bin())
            .args(["data", "get", "cifar10", "--dir"])
            .arg(tmp.path())
            .env("DCL_CIFAR10_URL", &url)
            .env("DCL_CIFAR10_MD5", &md5)
            .output()
            .unwrap()
    };
    let listing = || -> Vec<String> {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect()
    };
    // Corrupted, truncated (with an honest length) and cut short: refused, nothing left behind.
    for (what, needle) in [
        ("corrupted", "checksum mismatch"),
        ("truncated", "checksum mismatch"),
        ("cut short", "could not download"),
    ] {
        let out = get();
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{what}: {}", stderr(&out));
        assert!(listing().is_empty(), "{what}: left {:?}", listing());
    }
    let out = get();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(listing(), vec!["cifar-10-binary.tar.gz"]);
    // Found by name in the folder it went to, and read as CIFAR-10.
    let info = Command::new(dcl_bin())
        .args(["data", "info", "cifar10", "--json"])
        .env("DCL_DATA", tmp.path())
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", stderr(&info));
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        (&info["train_images"], &info["test_images"]),
        (&20.into(), &4.into()),
        "{info}"
    );
}

/// Hostile dataset files: each is refused with exit code 2 and a message that names the problem,
/// in a process whose heap and anonymous memory are limited to 256 MiB (`ulimit -d`: an
/// allocation past it would abort with another exit code).
#[test]
fn hostile_dataset_files_are_refused_within_256_mib() {
    let tmp = tempfile::tempdir().unwrap();
    let idx_header = |dims: &[u32]| -> Vec<u8> {
        let mut raw = vec![0, 0, 8, dims.len() as u8];
        raw.extend(dims.iter().flat_map(|d| d.to_be_bytes()));
        raw
    };
    // A gzip bomb: 47 MB promised, a gigabyte of zeros delivered.
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&idx_header(&[60_000, 28, 28])).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        bomb.write_all(&zeros).unwrap();
    }
    let bomb = bomb.finish().unwrap();
    // A tar entry promising a terabyte.
    let mut tar_bytes = Vec::new();
    {
        let mut header = tar::Header::new_gnu();
        header
            .set_path("cifar-10-batches-bin/data_batch_1.bin")
            .unwrap();
        header.set_size(1 << 40);
        header.set_cksum();
        tar_bytes.extend(header.as_bytes());
        tar_bytes.extend([0u8; 4096]);
    }
    // (case, its files by name, what the refusal must say)
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "idx-2g",
            vec![
                ("train-images-idx3-ubyte", idx_header(&[1 << 31, 28, 28])),
                ("train-labels-idx1-ubyte", idx_header(&[1 << 31])),
            ],
            "promise more than",
        ),
        (
            "idx-bomb",
            vec![
                ("train-images-idx3-ubyte.gz", bomb),
                ("train-labels-idx1-ubyte", idx_header(&[60_000])),
            ],
            "need 47040000",
        ),
        (
            "tar-tb",
            vec![("cifar-10-binary.tar.gz", tar_bytes)],
            "more than a CIFAR archive holds",
        ),
    ];
    for (name, files, needle) in cases {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, bytes) in &files {
            std::fs::write(dir.join(file), bytes).unwrap();
        }
        let target = match files.len() {
            1 => dir.join(files[0].0),
            _ => dir.clone(),
        };
        let out = Command::new("bash")
            .args(["-c", "ulimit -d 262144 && exec \"$0\" data info \"$1\""])
            .arg(dcl_bin())
            .arg(&target)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{name}: {}", stderr(&out));
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn bench_loss_reports_both_paths_and_the_fused_memory_stays_linear() {
    let out = dcl(&[
        "bench", "loss", "--n", "256,1024", "--d", "16", "--reps", "1", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let peak = |n: u64, path: &str| {
        let row = rows
            .iter()
            .find(|r| r["n"] == n && r["path"] == path)
            .unwrap_or_else(|| panic!("no {path} row for n={n}: {rows:?}"));
        assert_eq!(row["d"], 16);
        assert!(row["ms"].as_f64().unwrap() > 0.0);
        row["peak_bytes"].as_u64().unwrap()
    };
    // The report sums the buffers the kernel really allocated: at least the two views it was
    // given, and linear in N: O(N·D), no N x N matrix (which would make four times the batch
    // sixteen times the memory). Both sizes fill whole 512-row tiles, so no padding skews it.
    let (small, large) = (peak(256, "fused"), peak(1024, "fused"));
    assert!(
        small >= 2 * 256 * 16 * 4,
        "{small} bytes hold less than the views"
    );
    assert!(large > 3 * small && large < 5 * small, "{small} -> {large}");
    assert!(peak(1024, "reference") > 0);
    let out = dcl(&["bench", "loss", "--device", "cpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device wgpu"));
}

/// The table `dcl bench train` prints on the CPU, where no kernel is timed (it panicked there
/// once, after the row).
#[test]
fn bench_train_prints_its_table_on_the_cpu() {
    let out = dcl(&[
        "bench",
        "train",
        "--device",
        "cpu",
        "--model",
        "resnet-mini",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--threads",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| resnet-mini | 4 | cpu | 1 |"))
        .unwrap_or_else(|| panic!("no row for the run in:\n{stdout}"));
    let rate: f64 = row.split('|').nth(5).unwrap().trim().parse().unwrap();
    assert!(rate > 0.0, "{row}");
}

#[test]
fn experiment_npc_writes_its_tables_and_q_falls_with_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_cifar10(tmp.path(), 2, 40, 10);
    let out_dir = tmp.path().join("npc");
    let out = dcl(&[
        "experiment",
        "npc",
        "--data",
        data.to_str().unwrap(),
        "--batch-sizes",
        "4,32",
        "--temperatures",
        "0.1,0.5",
        "--anchors",
        "64",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<Value> =
        serde_json::from_slice(&std::fs::read(out_dir.join("npc.json")).unwrap()).unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let mean = |batch: u64, t: f64| {
        let row = rows
            .iter()
            .find(|r| r["batch_size"] == batch && r["temperature"] == t)
            .unwrap();
        assert_eq!(row["anchors"], 64);
        row["q"]["mean"].as_f64().unwrap()
    };
    for t in [0.1, 0.5] {
        let (small, large) = (mean(4, t), mean(32, t));
        assert!(
            0.0 < small && small < large && large < 1.0,
            "t {t}: {small} vs {large}"
        );
    }
    let md = std::fs::read_to_string(out_dir.join("npc.md")).unwrap();
    assert!(md.contains("| untrained | 32 | 0.5 | 64 |"), "{md}");
    let svg = std::fs::read_to_string(out_dir.join("npc.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}

/// A run folder's logged events, whole lines only (a kill may cut the last one short).
fn run_events(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

#[test]
fn batch_sweep_runs_its_grid_and_survives_kill_9() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let data = write_cifar10(tmp.path(), 1, 64, 20);
    let out_dir = tmp.path().join("sweep");
    let sweep = || {
        let mut cmd = Command::new(dcl_bin());
        cmd.args([
            "experiment",
            "batch-sweep",
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--losses",
            "dcl,infonce",
            "--batch-sizes",
            "8,16",
            "--seeds",
            "2",
        ])
        .args(["--epochs", "3", "--limit", "32", "--model", "resnet-mini"])
        .args(["--knn-k", "5", "--out", out_dir.to_str().unwrap()]);
        cmd
    };
    let mut child = sweep().stderr(std::process::Stdio::null()).spawn().unwrap();
    // Kill -9 inside the second cell's second epoch, after its first checkpoint.
    let second = out_dir.join("infonce-b8-s1");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !run_events(&second)
        .iter()
        .any(|e| e["event"] == "step" && e["epoch"] == 1)
    {
        assert!(Instant::now() < deadline, "the second cell did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = out_dir.join("dcl-b8-s1");
    let finished = |p: &Path| std::fs::read(p.join("scores.json")).ok();
    let first_scores = finished(&first).expect("the first cell finished");
    let first_log = std::fs::read(first.join("metrics.jsonl")).unwrap();
    assert!(
        finished(&second).is_none(),
        "the kill did not land inside the second cell"
    );
    assert_eq!(
        std::fs::read_to_string(second.join("checkpoints/latest")).unwrap(),
        "epoch-0001"
    );

    let out = sweep().output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("cell dcl-b8-s1"),
        "a finished cell was redone"
    );
    assert_eq!(finished(&first).unwrap(), first_scores);
    assert_eq!(
        std::fs::read(first.join("metrics.jsonl")).unwrap(),
        first_log
    );

    let results: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["cells"].as_array().unwrap().len(), 8);
    assert_eq!(results["untrained"].as_array().unwrap().len(), 2);
    // A top-1 on 20 synthetic test images whose labels follow their index, fitted on 32 such
    // images: any value in [0, 1] is a probe that ran (the L-BFGS probe gets 0 of 20 here).
    let pixels_probe = results["pixels"]["linear"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&pixels_probe), "{pixels_probe}");
    let md = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    for row in [
        "| raw pixels | - |",
        "| untrained | - |",
        "| dcl | 8 |",
        "| infonce | 16 |",
    ] {
        assert!(md.contains(row), "{row} missing in\n{md}");
    }
    assert!(
        md.contains("## Paired difference: dcl minus infonce"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out_dir.join("results.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 2);

    // Other settings in the same folder are refused, not mixed in.
    let out = sweep().args(["--temperature", "0.5"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("grid.json"), "{}", stderr(&out));
}

/// `mpirun -np 2 dcl pretrain` on loopback: the run is the one-process run on two peers
/// (`--devices cpu,cpu`), bit for bit, and its first steps are one device's to float rounding
/// (negatives gathered, batch norms synced); kill -9 of rank 1 ends the job with an error that
/// names it and leaves the last checkpoint; `--resume` under mpirun ends the run as the
/// uninterrupted one did, bit for bit.
#[cfg(feature = "mpi")]
#[test]
fn pretrain_under_mpirun_matches_one_process_and_survives_kill_9() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let data = write_cifar10(tmp.path(), 1, 128, 20);
    let pretrain = |cmd: &mut Command, out: &Path| {
        cmd.args(["pretrain", "--data", data.to_str().unwrap()])
            .args(["--limit", "128", "--epochs", "3", "--batch-size", "32"])
            .args(["--optimizer", "sgd", "--lr", "0.05", "--seed", "11"])
            .args(["--out", out.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
    };
    let mpirun = |out: &Path| {
        let mut cmd = Command::new("mpirun");
        cmd.args(["-np", "2", "--oversubscribe", dcl_bin()])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        pretrain(&mut cmd, out);
        cmd
    };
    let losses = |run: &Path| -> Vec<f64> {
        let steps = run_events(run).into_iter().filter(|e| e["event"] == "step");
        steps.map(|e| e["loss"].as_f64().unwrap()).collect()
    };
    let finish = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };

    let one = tmp.path().join("one");
    let mut alone = Command::new(dcl_bin());
    pretrain(&mut alone, &one);
    finish(&mut alone);
    let two = tmp.path().join("two");
    assert!(finish(&mut mpirun(&two)).contains("rank 1 of 2: from epoch 0"));
    let peers = tmp.path().join("peers");
    let mut in_process = Command::new(dcl_bin());
    pretrain(&mut in_process, &peers);
    finish(in_process.args(["--devices", "cpu,cpu"]));
    let (one_losses, two_losses) = (losses(&one), losses(&two));
    assert_eq!((one_losses.len(), two_losses.len()), (12, 12));
    assert_eq!(
        two_losses,
        losses(&peers),
        "mpirun against --devices cpu,cpu"
    );
    // Later steps drift apart from one device's as training amplifies the split's rounding, by
    // how much depends on the machine: 1e-6 relative at step 3 where this test was written,
    // 1.3e-2 on another (the same binary), where the peers in one process drift as far.
    let apart = |a: f64, b: f64| (a - b).abs() / a.abs();
    for (step, (&a, &b)) in one_losses.iter().zip(&two_losses).take(2).enumerate() {
        assert!(
            apart(a, b) <= 1e-5,
            "step {step}: {one_losses:?}\nvs\n{two_losses:?}"
        );
    }

    let killed = tmp.path().join("killed");
    let job = mpirun(&killed).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !run_events(&killed)
        .iter()
        .any(|e| e["event"] == "step" && e["epoch"] == 1)
    {
        assert!(Instant::now() < deadline, "the second epoch did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let rank1 = mpi_rank_pid(job.id(), 1).expect("rank 1 among mpirun's children");
    assert!(Command::new("kill")
        .args(["-9", &rank1.to_string()])
        .status()
        .unwrap()
        .success());
    let out = job.wait_with_output().unwrap();
    assert!(!out.status.success());
    // mpirun's own report: "process rank 1 with PID ... exited on signal 9 (Killed)".
    assert!(stderr(&out).contains("process rank 1"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(killed.join("checkpoints/latest")).unwrap(),
        "epoch-0001"
    );
    let resumed = finish(mpirun(&killed).arg("--resume"));
    assert!(resumed.contains("resuming"), "{resumed}");
    assert!(resumed.contains("rank 1 of 2: from epoch 1"), "{resumed}");
    assert_eq!(losses(&killed), two_losses);
}

/// The process of MPI rank `rank` among `mpirun`'s children (OpenMPI starts the local ranks
/// itself and tells each its rank in its environment).
#[cfg(feature = "mpi")]
fn mpi_rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    let child_of_mpirun = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After the command's name in parentheses: the state, then the parent's pid.
        let after_name = stat.rsplit(')').next().unwrap_or_default();
        after_name.split_whitespace().nth(1) == Some(&mpirun.to_string())
    };
    let has_rank = |pid: u32| {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        (environ.split(|&b| b == 0)).any(|var| var == wanted.as_bytes())
    };
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .find(|&pid| child_of_mpirun(pid) && has_rank(pid))
}

/// One line of `/proc/PID/status` (`Threads`, `VmHWM` in kB, ...), as a number.
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends `request` to `addr` and reads the whole answer: (status line, body).
fn http(addr: &str, request: &[u8]) -> (String, Vec<u8>) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = String::from_utf8_lossy(&answer[..split]);
    let status = status.lines().next().unwrap().to_string();
    (status, answer[split + 4..].to_vec())
}

/// `dcl serve` under load: 200 clients at once fetch an 8 MB module and the dataset's files while
/// 20 slow clients hold half-sent requests and 20 send garbage. Every well-formed request gets
/// its whole file, the garbage a 400; afterwards the server is back to its idle thread count, and
/// its peak memory stayed far below one copy of the module per client (files are streamed).
#[test]
fn serve_answers_200_concurrent_clients_and_recovers() {
    use std::io::{BufRead, BufReader};
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("index.html"), "<!doctype html>").unwrap();
    std::fs::create_dir_all(root.path().join("www/pkg")).unwrap();
    let module: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(root.path().join("www/pkg/dcl_bg.wasm"), &module).unwrap();
    let labels = std::fs::read(format!("{FASHION_MNIST}/t10k-labels-idx1-ubyte.gz")).unwrap();
    let mut server = Command::new(dcl_bin())
        .args(["serve", "--port", "0", "--offline", "--data", FASHION_MNIST])
        .arg("--root")
        .arg(root.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first.split("http://").nth(1).unwrap();
    let addr = addr.split_whitespace().next().unwrap().to_string();
    let pid = server.id();
    assert_eq!(http(&addr, b"GET / HTTP/1.1\r\n\r\n").0, "HTTP/1.1 200 OK");
    // Idle, the server is its accept loop alone; a handler's thread ends just after its answer.
    let settled_threads = || {
        for _ in 0..100 {
            if proc_status(pid, "Threads:") == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        proc_status(pid, "Threads:")
    };
    assert_eq!(settled_threads(), 1);

    let slow: Vec<_> = (0..20)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /index.html HTTP/1.1\r\nHost: x").unwrap();
            s
        })
        .collect();
    // 20 malformed (every 11th), 200 well-formed: a fifth for a dataset file, the rest the module.
    let clients: Vec<_> = (0..220)
        .map(|i| {
            let (addr, module_len, labels) = (addr.clone(), module.len(), labels.clone());
            std::thread::spawn(move || match (i % 11, i % 5) {
                (0, _) => {
                    let (status, _) = http(&addr, b"BREW /pot\r\n\r\n");
                    assert_eq!(status, "HTTP/1.1 400 Bad Request");
                }
                (_, 0) => {
                    let request = b"GET /data/t10k-labels-idx1-ubyte.gz HTTP/1.1\r\n\r\n";
                    let (status, body) = http(&addr, request);
                    assert_eq!((status.as_str(), body == labels), ("HTTP/1.1 200 OK", true));
                }
                _ => {
                    let (status, body) = http(&addr, b"GET /www/pkg/dcl_bg.wasm HTTP/1.1\r\n\r\n");
                    assert_eq!(
                        (status.as_str(), body.len()),
                        ("HTTP/1.1 200 OK", module_len)
                    );
                    assert!(body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let busy = proc_status(pid, "Threads:");
    drop(slow);
    // The slow clients' threads end when their connections close.
    let threads = settled_threads();
    let peak_mib = proc_status(pid, "VmHWM:") / 1024;
    server.kill().unwrap();
    server.wait().unwrap();
    eprintln!(
        "dcl serve: {busy} threads with the slow clients, {threads} after; peak RSS {peak_mib} MiB"
    );
    assert_eq!(threads, 1, "threads left behind");
    // One copy of the module per concurrent client would be 1.6 GB.
    assert!(peak_mib < 256, "peak RSS {peak_mib} MiB");
}

fn gpu_check(args: &[&std::ffi::OsStr]) -> Output {
    Command::new("python3")
        .arg("scripts/gpu-check")
        .args(args)
        .output()
        .unwrap()
}

/// `scripts/gpu-check` without a GPU: it packs a bundle from the binary built here and a data
/// folder; run on a machine without a card, every step fails with its own line and the JSON and
/// the table are still written; a past result renders as the README's table; bad input exits 2.
#[test]
fn gpu_check_packs_runs_without_a_gpu_and_renders() {
    use std::ffi::OsStr;
    let tmp = tempfile::tempdir().unwrap();
    let (data, bundle, out) = (
        tmp.path().join("data"),
        tmp.path().join("bundle"),
        tmp.path().join("out"),
    );
    std::fs::create_dir(&data).unwrap();
    let missing = gpu_check(&[
        "--pack".as_ref(),
        bundle.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("no Fashion-MNIST here"),
        "{}",
        stderr(&missing)
    );
    for f in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        std::fs::copy(Path::new(FASHION_MNIST).join(f), data.join(f)).unwrap();
    }
    let packed = gpu_check(&[
        "--pack".as_ref(),
        bundle.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--dcl".as_ref(),
        dcl_bin().as_ref(),
    ]);
    assert!(packed.status.success(), "{}", stderr(&packed));
    assert!(bundle.join("dcl.gz").is_file() && bundle.join("fashion-mnist").is_dir());

    let ran = gpu_check(&[
        "--bundle".as_ref(),
        bundle.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(ran.status.success(), "{}", stderr(&ran));
    let results: Value =
        serde_json::from_slice(&std::fs::read(out.join("gpu-check.json")).unwrap()).unwrap();
    let errors: Vec<&str> = results["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 6, "{errors:?}");
    for (error, step) in errors.iter().zip([
        "bench resnet-mini:",
        "bench resnet18:",
        "pretrain:",
        "pair dcl:",
        "pair infonce:",
        "bench resnet18 bf16-mixed:",
    ]) {
        assert!(error.starts_with(step) && error.contains("cuda"), "{error}");
    }
    let table = std::fs::read_to_string(out.join("gpu-check.md")).unwrap();
    assert!(
        table.contains("- failed: bench resnet-mini: exit 2"),
        "{table}"
    );

    let rendered = gpu_check(&[
        "--render".as_ref(),
        OsStr::new("tests/fixtures/gpu-check.json"),
    ]);
    let rendered = String::from_utf8_lossy(&rendered.stdout).into_owned();
    for row in [
        "| `resnet-mini` | 256 | cuda | 4,000.0 | 5,000.0 | 0.80 | 20.5 | 10.2 | 30.0 | 1.5 | 32.9% |",
        "| `resnet18` | 256 | cuda | 1,234.5 | 2,469.0 | 0.50 | 20.0 | 60.0 | 140.0 | 3.0 | - |",
        "| `resnet18` (bf16-mixed) | 256 | cuda | 2,000.0 | - | - | 20.0 | 30.0 | 70.0 | 3.0 | 16.0% |",
        "468 steps in 95 s, 3,000.0 images/s.",
        "| epoch 0 (untrained) | 0.8200 | 0.7700 | 0.8300 |",
        "| raw pixels | 0.8475 | 0.8125 | 0.8505 |",
        "- failed: bench resnet18: exit 1: an example error",
    ] {
        assert!(rendered.contains(row), "{row} not in\n{rendered}");
    }
    let not_json = gpu_check(&["--render".as_ref(), OsStr::new("Cargo.toml")]);
    assert_eq!(not_json.status.code(), Some(2));
    assert!(stderr(&not_json).contains("not a gpu-check.json"));
}
