//! Criterion benchmark of the frame codec: encoding and decoding an
//! `Assign` (the smallest frame on a job's hot path) and a 64 KiB `Log`
//! chunk (the largest frame a runner sends routinely), reported in MB/s of
//! frame bytes. It measures only; `cargo xtask bench` and
//! `docs/benchmarks.md` record the figures.

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use surveil_proto::{Assign, Codec, Envelope, Log, Stream};
use tokio_util::codec::{Decoder, Encoder};

fn frames() -> Vec<(&'static str, Envelope)> {
    let assign = Assign {
        job_id: 123_456,
        attempt: 2,
        repo: "/srv/git/surveil-app".into(),
        branch: "main".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        r#ref: "refs/heads/main".into(),
    };
    let data: Vec<u8> = (0..64 * 1024)
        .map(|i| b"surveil log line\n"[i % 17])
        .collect();
    let log = Log {
        job_id: 123_456,
        attempt: 2,
        task: 1,
        stream: Stream::Stdout as i32,
        offset: 1 << 20,
        data: Bytes::from(data),
    };
    vec![("Assign", assign.into()), ("Log 64KiB", log.into())]
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for (name, frame) in frames() {
        let mut encoded = BytesMut::new();
        Codec::new()
            .encode(&frame, &mut encoded)
            .expect("the frame is under the limit");
        let encoded = encoded.freeze();
        group.throughput(Throughput::BytesDecimal(encoded.len() as u64));

        // The buffer is reused, as a connection's write buffer is.
        let mut codec = Codec::new();
        let mut out = BytesMut::with_capacity(encoded.len());
        group.bench_with_input(BenchmarkId::new("encode", name), &frame, |b, frame| {
            b.iter(|| {
                out.clear();
                codec.encode(frame, &mut out).expect("encodes");
                std::hint::black_box(out.len())
            });
        });

        let mut codec = Codec::new();
        let mut input = BytesMut::with_capacity(encoded.len());
        group.bench_with_input(BenchmarkId::new("decode", name), &encoded, |b, encoded| {
            b.iter(|| {
                input.clear();
                input.extend_from_slice(encoded);
                let frame = codec.decode(&mut input).expect("decodes");
                std::hint::black_box(frame)
            });
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
