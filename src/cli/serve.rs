//! `dcl serve`: the playground's static server (index.html, www/, the wasm build) plus the
//! dataset it finds on disk, offered under `/data/`. Plain std networking: it serves one machine's
//! browser, not the internet.

use crate::data::discover::{files_dir, resolve};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    if write_header(stream, status, kind, body.len() as u64).is_ok() && !head {
        let _ = stream.write_all(body);
    }
}

/// A file streamed from disk: 200 clients fetching the 14 MB wasm module at once hold a socket
/// buffer each, not a copy of the module each.
fn respond_file(stream: &mut TcpStream, path: &Path, head: bool) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    write_header(stream, "200 OK", content_type(&path.to_string_lossy()), len)?;
    if !head {
        std::io::copy(&mut file.take(len), stream)?;
    }
    Ok(())
}

fn write_header(stream: &mut TcpStream, status: &str, kind: &str, len: u64) -> std::io::Result<()> {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len}\r\n\
         Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(header.as_bytes())
}

/// The parts of a request the server uses.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub method: String,
    pub target: String,
}

/// The longest request line or header line read, and the most header lines.
const MAX_LINE: u64 = 8 << 10;
const MAX_HEADERS: usize = 100;

/// Reads a request line and its headers (read to the blank line and dropped, so that closing the
/// connection after the answer does not reset it), within [`MAX_LINE`] and [`MAX_HEADERS`].
pub fn read_request(input: &mut impl BufRead) -> Result<Request, &'static str> {
    let mut read_line = || -> Result<String, &'static str> {
        let mut line = Vec::new();
        input
            .by_ref()
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|_| "unreadable request")?;
        if line.last() != Some(&b'\n') {
            return Err("request line or header too long, or cut short");
        }
        String::from_utf8(line).map_err(|_| "request is not UTF-8")
    };
    let line = read_line()?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if !version.starts_with("HTTP/") || !target.starts_with('/') {
        return Err("malformed request line");
    }
    let request = Request {
        method: method.to_string(),
        target: target.to_string(),
    };
    for _ in 0..MAX_HEADERS {
        if read_line()?.trim_end().is_empty() {
            return Ok(request);
        }
    }
    Err("too many headers")
}

/// How long a client may take to send its request or to take the answer.
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn handle(mut stream: TcpStream, root: &Path, data: &Result<Offer, String>) {
    let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let request = read_request(&mut BufReader::new(&stream));
    let Request { method, target } = match request {
        Ok(r) => r,
        Err(problem) => {
            let body = problem.as_bytes();
            return respond(&mut stream, "400 Bad Request", "text/plain", body, false);
        }
    };
    let (method, target) = (method.as_str(), target.as_str());
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
    match file.filter(|f| f.is_file()) {
        // A client that goes away mid-answer needs nothing more.
        Some(file) => drop(respond_file(&mut stream, &file, head)),
        None => not_found(&mut stream),
    }
}

/// The most clients answered at once; more are told to retry (each client holds a thread for at
/// most [`CLIENT_TIMEOUT`] per read or write, so slow clients cannot pile threads up unbounded).
const MAX_CLIENTS: usize = 256;

/// Serves `root` on 127.0.0.1:`port` until the process is interrupted. `port` 0 picks a free one;
/// the first line printed says which.
pub fn serve(root: &Path, port: u16, data: Option<&str>, offline: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        root.join("index.html").is_file(),
        "{}: no index.html here; run from the repository root or pass --root",
        root.display()
    );
    if data.is_none() && !offline {
        fetch_cifar10();
    }
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
    let clients = Arc::new(AtomicUsize::new(0));
    for mut stream in listener.incoming().flatten() {
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
            let busy = b"too many clients at once; retry";
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                busy,
                false,
            );
            continue;
        }
        let (shared, clients) = (shared.clone(), clients.clone());
        std::thread::spawn(move || {
            handle(stream, &shared.0, &shared.1);
            clients.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

/// CIFAR-10, the page's intended default, fetched into the data cache unless it is already on
/// disk; offline, one line says what the page gets instead.
fn fetch_cifar10() {
    if resolve("cifar10").is_ok() {
        return;
    }
    let cache = crate::data::discover::data_cache();
    println!(
        "fetching CIFAR-10 (170 MB, checked against its MD5) into {} ...",
        cache.display()
    );
    if let Err(e) = super::download::download("cifar10", &cache) {
        let first = e.to_string();
        let first = first.split(". ").next().unwrap_or_default().to_string();
        println!(
            "offline? {first}: the page's default data is the first of fashion-mnist, mnist found"
        );
    }
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

    #[test]
    fn requests_are_read_whole_and_bounded() {
        let read = |text: &[u8]| read_request(&mut std::io::BufReader::new(text));
        let ok = read(b"GET /www/app.js?v=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!(
            (ok.method.as_str(), ok.target.as_str()),
            ("GET", "/www/app.js?v=1")
        );
        assert_eq!(
            read(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Err("request line or header too long, or cut short")
        );
        assert_eq!(read(b"GET\r\n\r\n"), Err("malformed request line"));
        assert_eq!(
            read(b"GET http://x/ HTTP/1.1\r\n\r\n"),
            Err("malformed request line")
        );
        let long = [b"GET /".as_slice(), &[b'a'; 9000], b" HTTP/1.1\r\n\r\n"].concat();
        assert!(read(&long).is_err());
        let many = [
            b"GET / HTTP/1.1\r\n".as_slice(),
            &b"X: y\r\n".repeat(200),
            b"\r\n",
        ]
        .concat();
        assert_eq!(read(&many), Err("too many headers"));
    }
}
