//! A tiny threaded HTTP/1.1 server with keep-alive for the traffic tests:
//! every response body is "<name> peer=<client ip:port>".

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    thread,
};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let listen = arg("--listen").unwrap_or_else(|| "0.0.0.0:8080".into());
    let name = arg("--name").unwrap_or_else(|| "server".into());
    let listener = TcpListener::bind(&listen)?;
    eprintln!("{name} listening on {listen}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.clone();
        thread::spawn(move || {
            let _ = serve(stream, &name);
        });
    }
    Ok(())
}

fn serve(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if l == "connection: close" {
                close = true;
            }
        }
        let body = format!("{name} peer={peer}\n");
        write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}", body.len())?;
        if close {
            return Ok(());
        }
    }
}
