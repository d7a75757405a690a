//! bench-etcd-load: fills (or changes a share of) an etcd keyspace for `bench/etcd`.
//!
//!   bench-etcd-load --endpoint http://127.0.0.1:2379 --keys 200000 --size 1024
//!   bench-etcd-load --endpoint ... --keys 200000 --size 1024 --change-percent 1 --seed 2

use clap::Parser;
use etcd_client::{Client, Txn, TxnOp};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    keys: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Rewrite this percentage of the keys (chosen by `seed`) instead of loading all.
    #[arg(long)]
    change_percent: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A deterministic pseudo-random value (xorshift), printable.
fn value(i: u64, seed: u64, size: usize) -> String {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let mut c = Client::connect([a.endpoint.as_str()], None).await?;
    let mut which: Vec<u64> = match a.change_percent {
        None => (0..a.keys as u64).collect(),
        Some(p) => {
            let n = ((a.keys as f64) * p / 100.0).round() as u64;
            let mut x = a.seed | 1;
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % a.keys as u64
                })
                .collect()
        }
    };
    // A transaction may not name a key twice.
    which.sort_unstable();
    which.dedup();
    for batch in which.chunks(128) {
        let ops: Vec<TxnOp> = batch
            .iter()
            .map(|&i| TxnOp::put(format!("/registry/bench/{i:08}"), value(i, a.seed, a.size), None))
            .collect();
        c.txn(Txn::new().and_then(ops)).await?;
    }
    println!("wrote {} keys", which.len());
    Ok(())
}
