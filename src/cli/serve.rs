//! `dcl serve`: the playground's static server (index.html, www/, the wasm build) plus the
//! dataset it finds on disk, offered under `/data/`. Plain std networking: it serves one machine's
//! browser, not the internet.

use crate::data::discover::{files_dir, resolve};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// Datasets offered when `--data` is not given, in order of preference.
const DEFAULT_DATA: [&str; 3] = ["cifar10", "fashion-mnist", "mnist"];

/// The dataset files offered to the page, by the name the page fetches them under.
struct Offer {
    name: String,
    files: HashMap<String, PathBuf>,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Files a reader can use: CIFAR archives and batches, IDX files.
fn is_dataset_file(name: &str) -> bool {
    name.ends_with(".tar.gz") || name.ends_with(".bin") || name.contains("-idx")
}

fn offer(spec: &str) -> anyhow::Result<Offer> {
    let path = resolve(spec)?;
    let mut files = HashMap::new();
    if path.is_file() {
        files.insert(file_name(&path), path.clone());
    } else {
        for entry in std::fs::read_dir(files_dir(&path))? {
            let p = entry?.path();
            if p.is_file() && is_dataset_file(&file_name(&p)) {
                files.insert(file_name(&p), p);
            }
        }
    }
    anyhow::ensure!(
        !files.is_empty(),
        "--data {spec}: {} holds no dataset files",
        path.display()
    );
    Ok(Offer {
        name: file_name(&path),
        files,
    })
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "wgsl" | "md" | "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A URL path as a path under `root`, refusing anything that could climb out of it.
fn local_path(root: &Path, url_path: &str) -> Option<PathBuf> {
    let rel = Path::new(url_path.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let rel = if url_path == "/" {
        Path::new("index.html")
    } else {
        rel
    };
    Some(root.join(rel))
}

fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8], head: bool) {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(header.as_bytes());
    if !head {
        let _ = stream.write_all(body);
    }
}

fn handle(mut stream: TcpStream, root: &Path, data: &Result<Offer, String>) {
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let head = method == "HEAD";
    if method != "GET" && !head {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET only",
            false,
        );
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let not_found =
        |stream: &mut TcpStream| respond(stream, "404 Not Found", "text/plain", b"not found", head);
    if path == "/data/manifest.json" {
        let manifest = match data {
            Ok(offer) => {
                let mut names: Vec<&String> = offer.files.keys().collect();
                names.sort();
                serde_json::json!({ "name": offer.name, "files": names })
            }
            Err(e) => serde_json::json!({ "name": null, "error": e }),
        };
        let body = manifest.to_string();
        return respond(
            &mut stream,
            "200 OK",
            "application/json",
            body.as_bytes(),
            head,
        );
    }
    let file = match path.strip_prefix("/data/") {
        Some(name) => data.as_ref().ok().and_then(|o| o.files.get(name).cloned()),
        None => local_path(root, path),
    };
    let Some(file) = file else {
        return not_found(&mut stream);
    };
    match std::fs::read(&file) {
        Ok(body) => {
            let kind = content_type(&file.to_string_lossy());
            respond(&mut stream, "200 OK", kind, &body, head)
        }
        Err(_) => not_found(&mut stream),
    }
}

/// Serves `root` on 127.0.0.1:`port` until the process is interrupted. `port` 0 picks a free one;
/// the first line printed says which.
pub fn serve(root: &Path, port: u16, data: Option<&str>) -> anyhow::Result<()> {
    anyhow::ensure!(
        root.join("index.html").is_file(),
        "{}: no index.html here; run from the repository root or pass --root",
        root.display()
    );
    let offer = match data {
        Some(spec) => offer(spec).map_err(|e| e.to_string()),
        None => DEFAULT_DATA
            .iter()
            .find_map(|name| offer(name).ok())
            .ok_or_else(|| {
                format!(
                    "no dataset found ({} looked up); pick a CIFAR-10 archive in the page, \
                     or install Debian's dataset-fashion-mnist",
                    DEFAULT_DATA.join(", ")
                )
            }),
    };
    if let Err(e) = &offer {
        if data.is_some() {
            anyhow::bail!("{e}");
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", port))
        .map_err(|e| anyhow::anyhow!("--port {port}: cannot listen: {e}"))?;
    let url = format!("http://{}", listener.local_addr()?);
    match &offer {
        Ok(o) => println!("serving {url} (data: {}, {} files)", o.name, o.files.len()),
        Err(e) => println!("serving {url} (no data: {e})"),
    }
    std::io::stdout().flush()?;
    let shared = Arc::new((root.to_path_buf(), offer));
    for stream in listener.incoming().flatten() {
        let shared = shared.clone();
        std::thread::spawn(move || handle(stream, &shared.0, &shared.1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_leave_the_root() {
        let root = Path::new("/srv/dcl");
        assert_eq!(local_path(root, "/"), Some(root.join("index.html")));
        assert_eq!(
            local_path(root, "/www/app.js"),
            Some(root.join("www/app.js"))
        );
        assert_eq!(local_path(root, "/../etc/passwd"), None);
        assert_eq!(local_path(root, "/www/../../etc/passwd"), None);
        assert_eq!(content_type("/www/pkg/dcl_bg.wasm"), "application/wasm");
    }
}
