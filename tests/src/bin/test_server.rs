//! A tiny threaded HTTP/1.1 server with keep-alive for the traffic tests:
//! every response body starts "<name> peer=<client ip:port> received=<n>"
//! (n: bytes of request body read); GET /bytes/<n> pads it to n bytes.
//! With `--echo` it is a raw TCP echo server instead (any protocol's bytes,
//! back as they came). It also answers UDP datagrams on the same address
//! with "<name> peer=<client ip:port>".

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread,
};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let listen = arg("--listen").unwrap_or_else(|| "0.0.0.0:8080".into());
    let name = arg("--name").unwrap_or_else(|| "server".into());
    let echo = args.iter().any(|a| a == "--echo");
    let listener = TcpListener::bind(&listen)?;
    let udp = std::net::UdpSocket::bind(&listen)?;
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{udp_name} peer={peer}\n").as_bytes(), peer);
        }
    });
    eprintln!("{name} listening on {listen}{}", if echo { " (echo)" } else { "" });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if echo {
            thread::spawn(move || {
                let mut back = stream.try_clone()?;
                std::io::copy(&mut &stream, &mut back)?;
                back.shutdown(std::net::Shutdown::Write)
            });
            continue;
        }
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
        let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut close = false;
        let mut upload = 0usize;
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
            if let Some(v) = l.strip_prefix("content-length:") {
                upload = v.trim().parse().unwrap_or(0);
            }
        }
        // A request body (an upload) is read and counted.
        let received = std::io::copy(&mut (&mut reader).take(upload as u64), &mut std::io::sink())?;
        let mut body = format!("{name} peer={peer} received={received}\n").into_bytes();
        // GET /bytes/<n>: a response body of n bytes (a download).
        if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
            body.resize(n.max(body.len()), b'x');
        }
        // One write: a header and a body in two would wait on the client's
        // delayed ACK (Nagle) on keep-alive connections.
        let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n", body.len()).into_bytes();
        response.extend_from_slice(&body);
        out.write_all(&response)?;
        if close {
            return Ok(());
        }
    }
}
