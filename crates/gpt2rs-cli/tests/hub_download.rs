//! The hub download path, against a local HTTP server on 127.0.0.1 that serves checkpoints in
//! the Hugging Face URL layout (`/{repo}/resolve/{revision}/{file}`, with the etag,
//! x-repo-commit and content-range headers the hub sends). No internet is used.

use gpt2rs::checkpoint::{write_hf_checkpoint, StoredDtype};
use gpt2rs::config::Gpt2Config;
use gpt2rs::weights::ModelWeights;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A tiny HTTP/1.1 file server in the hub's layout.
struct HubServer {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl HubServer {
    fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(files);
        let (stop2, req2) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (files, req) = (files.clone(), req2.clone());
                        std::thread::spawn(move || handle(stream, &files, &req));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Self {
            port,
            stop,
            requests,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn handle(stream: TcpStream, files: &HashMap<String, Vec<u8>>, log: &Mutex<Vec<String>>) {
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range_start = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            range_start = r
                .trim()
                .split('-')
                .next()
                .and_then(|s| s.parse::<usize>().ok());
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    log.lock().unwrap().push(path.clone());
    let mut out = stream;
    let Some(body) = files.get(&path) else {
        let _ = write!(
            out,
            "HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found"
        );
        return;
    };
    // Blob names in the cache come from the etag: a content hash, as on the hub.
    let etag = format!(
        "{:016x}",
        body.iter()
            .fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64)
                .wrapping_mul(0x100000001b3))
    );
    let start = range_start.unwrap_or(0).min(body.len());
    let part = &body[start..];
    let _ = write!(
        out,
        "HTTP/1.1 206 Partial Content\r\netag: \"{etag}\"\r\nx-repo-commit: 0123456789abcdef0123456789abcdef01234567\r\n\
         content-range: bytes {start}-{}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len().saturating_sub(1),
        body.len(),
        part.len()
    );
    let _ = out.write_all(part);
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gpt2rs-hub-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A checkpoint with GPT-2's vocabulary (so the built-in tokenizer fits) but tiny width.
fn tiny_checkpoint(dir: &Path) {
    let mut c = Gpt2Config::preset("gpt2").unwrap();
    c.n_layer = 1;
    c.n_embd = 16;
    c.n_head = 2;
    c.n_inner = 32;
    c.n_positions = 64;
    write_hf_checkpoint(&ModelWeights::synthetic(&c, 5), dir, StoredDtype::F16).unwrap();
}

/// Serves `dir`'s files as repository `repo` at revision main.
fn repo_files(repo: &str, dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (
                format!("/{repo}/resolve/main/{name}"),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Splits model.safetensors into two shards plus model.safetensors.index.json.
fn shard(dir: &Path) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
}

fn gpt2rs(model: &str, endpoint: &str, cache: &Path, offline: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpt2rs"));
    cmd.args([
        "generate", "--model", model, "--prompt", "Hello", "-n", "4", "--greedy",
    ])
    .env("HF_ENDPOINT", endpoint)
    .env("HF_HUB_CACHE", cache)
    .env_remove("HF_HOME")
    .env_remove("HF_TOKEN");
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    } else {
        cmd.env_remove("HF_HUB_OFFLINE");
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn downloads_into_the_shared_cache_then_works_offline() {
    let src = temp_dir("src");
    tiny_checkpoint(&src);
    let sharded = temp_dir("sharded");
    tiny_checkpoint(&sharded);
    shard(&sharded);
    let mut files = repo_files("tester/tiny-gpt2", &src);
    files.extend(repo_files("tester/tiny-sharded", &sharded));
    let server = HubServer::start(files);
    let cache = temp_dir("cache");

    // Online: the files are fetched into the hub cache layout transformers uses.
    let out = gpt2rs("tester/tiny-gpt2", &server.endpoint(), &cache, false);
    assert!(out.status.success(), "download failed: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Hello"));
    let repo_dir = cache.join("models--tester--tiny-gpt2");
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    assert_eq!(commit.trim(), "0123456789abcdef0123456789abcdef01234567");
    let snapshot = repo_dir.join("snapshots").join(commit.trim());
    assert!(snapshot.join("config.json").exists() && snapshot.join("model.safetensors").exists());
    let requests = server.requests.lock().unwrap().clone();
    assert!(
        requests.iter().any(|r| r.ends_with("/tokenizer.json")),
        "asks for the checkpoint's tokenizer"
    );

    // Sharded checkpoints: the index, then every shard it lists.
    let out = gpt2rs("tester/tiny-sharded", &server.endpoint(), &cache, false);
    assert!(
        out.status.success(),
        "sharded download failed: {}",
        stderr(&out)
    );
    let snap = cache
        .join("models--tester--tiny-sharded/snapshots/0123456789abcdef0123456789abcdef01234567");
    assert!(snap.join("model-00002-of-00002.safetensors").exists());

    // A repository the hub does not have.
    let out = gpt2rs("tester/missing", &server.endpoint(), &cache, false);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));

    // Offline: the cache is enough, and the server is not asked again.
    let before = server.requests.lock().unwrap().len();
    drop(server);
    let out = gpt2rs("tester/tiny-gpt2", "http://127.0.0.1:9", &cache, true);
    assert!(
        out.status.success(),
        "offline load failed: {}",
        stderr(&out)
    );

    // Offline and not cached: say what to do.
    let out = gpt2rs("tester/other", "http://127.0.0.1:9", &cache, true);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HF_HUB_OFFLINE"), "{}", stderr(&out));

    // No network at all (nothing listens on the port): say what to do.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = gpt2rs("tester/other", &dead, &cache, false);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(
        msg.contains("network") && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    assert!(before > 0);
}
