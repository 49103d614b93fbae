//! Against real S3-compatible servers started here: moto_server (PyPI `moto[server]`)
//! and s3s-fs (crates.io), both of which answer listings in pages of 1,000 keys.
mod common;
use coldclone_repository::*;
use common::fault_proxy::FaultProxy;
use common::servers::*;
use common::*;

fn loc(port: u16, prefix: &str) -> Location {
    s3_loc(port, prefix)
}

#[test]
fn moto_s3_repository_full_cycle_and_concurrent_writers() {
    let Some(server) = start_moto() else { return };
    full_cycle(server.port);
}

/// s3s-fs (crates.io: `cargo install s3s-fs@0.14.1 --features binary --locked`) stores
/// objects as files and checks AWS signatures, which moto does not.
#[test]
fn s3s_fs_repository_full_cycle_and_signatures() {
    let Some(server) = start_s3s_fs() else { return };
    let port = server.port;
    // A wrong secret is refused by the server: the signature is really checked.
    let Location::S3 {
        endpoint,
        bucket,
        prefix,
        region,
        access_key,
        ..
    } = loc(port, "sig")
    else {
        unreachable!()
    };
    let bad = Location::S3 {
        endpoint,
        bucket,
        prefix,
        region,
        access_key,
        secret_key: "wrong".into(),
    };
    let e = Repository::init_with(&bad, "pw", &opts(16384))
        .err()
        .expect("a wrong secret key must fail");
    assert!(matches!(e, RepoError::S3 { .. }), "{e}");
    full_cycle(port);
}

/// A full backup of `img` as disk xvda of VM `vm<i>`; its snapshot id.
fn backup_as_vm(repo: &Repository, i: usize, img: &[u8]) -> String {
    repo.backup_disk(
        &MemSource(img.to_vec()),
        meta(&format!("vm{i}"), "xvda"),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap()
    .snapshot_id
}

fn full_cycle(port: u16) {
    let loc = loc(port, "fleet/repo1");
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    assert!(matches!(
        Repository::init_with(&loc, "pw", &o),
        Err(RepoError::AlreadyExists(_))
    ));
    assert!(matches!(
        Repository::open(&loc, "nope"),
        Err(RepoError::WrongPassword(_))
    ));

    // Several writers ("hosts") at once, each with its own handle, into one repository.
    // They share half their data, so they also race on the same chunks.
    let shared = random_bytes(99, 1 << 20);
    let imgs: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let mut v = shared.clone();
            v.extend(disk_image(10 + i, 3 << 20));
            v
        })
        .collect();
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = imgs
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let loc = loc.clone();
                s.spawn(move || {
                    let r = Repository::open(&loc, "pw").unwrap();
                    backup_as_vm(&r, i, img)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let repo2 = Repository::open(&loc, "pw").unwrap();
    assert_eq!(repo2.snapshots().unwrap().len(), 3);
    let c = repo2.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    let dir = TempDir::new("s3");
    for (i, id) in ids.iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        repo2.restore_with(id, &out, &FORCE, &NoProgress).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == imgs[i],
            "restore {i} differs"
        );
    }

    // Incremental with changed ranges over S3.
    let mut img = imgs[0].clone();
    img[2_000_000..2_004_096].copy_from_slice(&random_bytes(5, 4096));
    let inc = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm0", "xvda"),
            &BackupOptions {
                parent: Some(ids[0].clone()),
                changed_ranges: Some(std::iter::once(2_000_000..2_004_096).collect()),
            },
            &NoProgress,
        )
        .unwrap();
    assert!(inc.bytes_read <= 2 * 16384);
    let out = dir.path().join("inc");
    repo.restore_with(&inc.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == img);

    // forget + prune over S3.
    repo.forget(&ids[1]).unwrap();
    let p = repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert_eq!(p.kept.len(), 3);
    assert!(p.bytes_freed > 0, "{p:?}");
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    repo.restore_with(&ids[2], &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == imgs[2]);

    // Another prefix in the same bucket is another (absent) repository.
    assert!(matches!(
        Repository::open(&self::loc(port, "elsewhere"), "pw"),
        Err(RepoError::NotFound { .. })
    ));
}

/// Objects planted straight into the store, beside the repository's own.
type Plant<'a> = &'a dyn Fn(&str, &[u8]);

/// Listings longer than one page (both servers answer 1,000 keys a page): 1,200 foreign
/// objects under `snapshots/` and 1,200 under `data/`, named to sort before the
/// repository's own. A client that stopped after the first page would see none of the
/// real snapshots, and a prune deciding on such a listing would delete their data.
fn listing_beyond_one_page(server_port: u16, plant: Plant) {
    const PLANTED: usize = 1_200;
    let proxy = FaultProxy::start(server_port);
    let loc = loc(proxy.port, "big");
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let imgs: Vec<Vec<u8>> = (0..2).map(|i| random_bytes(70 + i, 96 << 10)).collect();
    let ids: Vec<String> = imgs
        .iter()
        .enumerate()
        .map(|(i, img)| backup_as_vm(&repo, i, img))
        .collect();
    for i in 0..PLANTED {
        plant(&format!("big/snapshots/0000{i:060x}"), b"not a snapshot");
        plant(&format!("big/data/00/0000{i:060x}"), b"not a pack");
    }
    let before = FaultProxy::count(&proxy.stats.list_continuations);
    let snaps = repo.snapshots().unwrap();
    let mut got: Vec<String> = snaps.iter().map(|s| s.id.clone()).collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(
        got, want,
        "the real snapshots sort after 1,200 planted objects"
    );
    assert!(
        FaultProxy::count(&proxy.stats.list_continuations) > before,
        "the listing took more than one page"
    );
    for (id, img) in ids.iter().zip(&imgs) {
        assert_eq!(&repo.find_snapshot(&id[..12]).unwrap().id, id);
        let dir = TempDir::new("big");
        let out = dir.path().join("out");
        repo.restore_with(id, &out, &FORCE, &NoProgress).unwrap();
        assert!(std::fs::read(&out).unwrap() == *img);
    }
    let c = repo.check(false).unwrap();
    assert_eq!(c.snapshots as usize, PLANTED + 2, "{:?}", c.errors.first());
    assert_eq!(c.damaged_snapshots.len(), PLANTED);
    assert_eq!(c.unindexed_packs as usize, PLANTED);
    // Prune must see every snapshot; with unreadable ones it refuses rather than guess.
    assert!(repo.prune(&RetentionPolicy::default(), true).is_err());
}

#[test]
fn moto_s3_listings_beyond_one_page() {
    let Some(server) = start_moto() else { return };
    let agent = ureq::agent();
    // moto does not check signatures: plant with plain PUTs.
    listing_beyond_one_page(server.port, &|key, data| {
        agent
            .put(&format!("http://127.0.0.1:{}/{BUCKET}/{key}", server.port))
            .send_bytes(data)
            .unwrap();
    });
}

#[test]
fn s3s_fs_listings_beyond_one_page() {
    let Some(server) = start_s3s_fs() else { return };
    let root = server.root.clone().unwrap().join(BUCKET);
    listing_beyond_one_page(server.port, &|key, data| {
        let p = root.join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    });
}
