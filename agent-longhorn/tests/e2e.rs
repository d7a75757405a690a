//! agent-longhorn against real block data: raw images made with `truncate` and
//! `mkfs.ext4`, files written into them with `debugfs` (no mount needed), and a real
//! coordinator on loopback. Longhorn itself (its manager API) is not exercised here.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use coffer_testkit::{self as kit, Coordinator};

const GRANTS: &str = "[agents.lh-1]\nassets = [\"longhorn/*\"]\n";
const MIB: u64 = 1 << 20;

fn agent(coord: &Coordinator, certs: &Path, dir: &Path, device: &Path) -> Command {
    let mut c = kit::agent("agent-longhorn", coord, certs, "lh-1", dir, "longhorn/pvc-1");
    c.arg("--device").arg(device).args(["--volume", "pvc-1"]);
    c
}

fn sha256(path: &Path) -> String {
    kit::ok(Command::new("sha256sum").arg(path)).split_whitespace().next().unwrap().to_string()
}

#[test]
fn blocks_holes_changed_blocks_sparse_restore_and_drill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = kit::certs(&dir.join("certs"), &["lh-1"], &[]);
    let coord = Coordinator::start(dir, &certs, GRANTS);

    // A 256 MiB sparse image with an ext4 filesystem holding 24 MiB of random data.
    let img = dir.join("volume.img");
    kit::ok(Command::new("truncate").args(["-s", "256M"]).arg(&img));
    kit::ok(Command::new("mkfs.ext4").args(["-F", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1"]).arg(&img));
    let payload = dir.join("payload.bin");
    std::fs::write(&payload, kit::random_bytes(24 << 20, 11)).unwrap();
    kit::ok(
        Command::new("debugfs").args(["-w", "-R"]).arg(format!("write {} payload.bin", payload.display())).arg(&img),
    );
    let original = sha256(&img);

    let out = kit::ok(agent(&coord, &certs, dir, &img).arg("backup"));
    let (first, size, new) = kit::backup_line(&out);
    assert!(size < 64 * MIB, "only data blocks are in the snapshot ({size} bytes of a 256 MiB volume): {out}");
    assert!((24 * MIB..40 * MIB).contains(&new), "random data is stored once, holes never: {out}");

    // Restore into a new image: sparse, and the whole volume identical.
    let restored = dir.join("restored.img");
    let o = kit::ok(agent(&coord, &certs, dir, &img).args(["restore", "--snapshot", &first, "--to"]).arg(&restored));
    assert!(o.contains("verified"), "{o}");
    assert_eq!(sha256(&restored), original);
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&restored).unwrap().blocks() * 512
    };
    assert!(allocated < 64 * MIB, "holes stay holes: {allocated} bytes allocated");

    // An existing target: refused without --force, refused at another size even with it.
    let o = kit::run(agent(&coord, &certs, dir, &img).args(["restore", "--to"]).arg(&restored));
    assert!(!o.status.success() && kit::stderr(&o).contains("--force"), "{}", kit::stderr(&o));
    let small = dir.join("small.img");
    kit::ok(Command::new("truncate").args(["-s", "128M"]).arg(&small));
    let o = kit::run(agent(&coord, &certs, dir, &img).args(["--force", "restore", "--to"]).arg(&small));
    assert!(!o.status.success() && kit::stderr(&o).contains("same size"), "{}", kit::stderr(&o));
    // With --force over a same-size image full of other data: the volume exactly.
    std::fs::write(&restored, vec![0xAB; 256 << 20]).unwrap();
    kit::ok(agent(&coord, &certs, dir, &img).args(["--force", "restore", "--snapshot", &first, "--to"]).arg(&restored));
    assert_eq!(sha256(&restored), original);

    // The drill: restore, every block and the whole-volume hash, then e2fsck read-only.
    let d = kit::ok(agent(&coord, &certs, dir, &img).args(["drill", "--scratch"]).arg(dir));
    assert!(d.contains("passed") && d.contains("e2fsck -f -n found the ext4 filesystem clean"), "{d}");
    assert!(d.contains("RTO") && d.contains("RPO"), "{d}");

    // Change 1% of the volume's blocks (2 of 128 blocks hold new data): the next backup
    // stores about that much.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&kit::random_bytes(2 * MIB as usize, 99), 200 * MIB).unwrap();
    f.write_all_at(&kit::random_bytes(2 * MIB as usize, 98), 220 * MIB).unwrap();
    f.sync_all().unwrap();
    let out = kit::ok(agent(&coord, &certs, dir, &img).arg("backup"));
    let (second, _, new) = kit::backup_line(&out);
    assert!((4 * MIB..5 * MIB).contains(&new), "two changed blocks cost two blocks: {out}");
    let again = dir.join("again.img");
    kit::ok(agent(&coord, &certs, dir, &img).args(["restore", "--snapshot", &second, "--to"]).arg(&again));
    assert_eq!(sha256(&again), sha256(&img));
}
