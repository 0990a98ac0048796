//! Criterion benches for the hot functions: the ingress session (command parsing, DATA
//! scanning, dot-unstuffing, line-ending normalisation, Received header) over an
//! in-memory stream with a delivery that does nothing.
//!
//! Run: `cargo bench --bench hot`.

use std::{net::SocketAddr, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smtp_oauth_relay::{
    envelope::{Deliver, Message},
    ingress::{run_session, IngressSettings},
    reply::Reply,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Discard;

impl Deliver for Discard {
    async fn deliver(&self, message: Message) -> Reply {
        std::hint::black_box(message.data.len());
        Reply::new(250, [2, 0, 0], "OK")
    }
}

/// A client conversation: EHLO, then `n` pipelined transactions, then QUIT.
fn conversation(n: usize, size: usize, dotted: bool) -> Vec<u8> {
    let mut body = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: bench\r\n\r\n".to_vec();
    let line: &[u8] = if dotted {
        b"..a dot-stuffed line of text, as a client sends it, 0123456789 abcdefghij\r\n"
    } else {
        b"a line of text, as a client sends it, 0123456789 abcdefghijklmnopqrstuvw\r\n"
    };
    while body.len() + line.len() <= size {
        body.extend_from_slice(line);
    }
    let mut c = b"EHLO bench.client\r\n".to_vec();
    for _ in 0..n {
        c.extend_from_slice(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n");
        c.extend_from_slice(&body);
        c.extend_from_slice(b".\r\n");
    }
    c.extend_from_slice(b"QUIT\r\n");
    c
}

fn session(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = IngressSettings::new("bench.relay".into());
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut g = c.benchmark_group("ingress_session");
    g.measurement_time(Duration::from_secs(5));
    for (size, dotted) in [(2048, false), (2048, true), (102_400, false)] {
        let n = 50;
        let input = conversation(n, size, dotted);
        g.throughput(Throughput::Elements(n as u64));
        let label = format!("{}B{}", size, if dotted { "-dotted" } else { "" });
        g.bench_with_input(
            BenchmarkId::new("pipelined_messages", label),
            &input,
            |b, input| {
                b.to_async(&rt).iter(|| async {
                    let (mut client, server) = tokio::io::duplex(256 * 1024);
                    let shutdown = CancellationToken::new();
                    let drive = async {
                        client.write_all(input).await.unwrap();
                        let mut sink = Vec::new();
                        client.read_to_end(&mut sink).await.unwrap();
                        sink.len()
                    };
                    let (_, n) = tokio::join!(
                        run_session(server, peer, &settings, &Discard, &shutdown),
                        drive
                    );
                    n
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, session);
criterion_main!(benches);
