//! The embedded S3 server as S3 clients see it: objects written by its own plain-PUT path read
//! back through s3s-fs with their bytes, content type and ETag, and requests that ask for more
//! (a Content-MD5, a signed digest) checked before anything is stored.

use aws_sdk_s3::config::RequestChecksumCalculation::{WhenRequired, WhenSupported};
use mediaflow_embedded::EmbeddedS3;
use mediaflow_store::{ObjectStore, StoreConfig};
use sha2::{Digest, Sha256};

struct Server {
    root: tempfile::TempDir,
    _s3: EmbeddedS3,
    config: StoreConfig,
    store: ObjectStore,
}

async fn server() -> Server {
    let root = tempfile::tempdir().unwrap();
    let config = StoreConfig::default();
    let s3 = EmbeddedS3::start(
        root.path(),
        "127.0.0.1:0".parse().unwrap(),
        &config.access_key,
        &config.secret_key,
    )
    .await
    .unwrap();
    let config = StoreConfig {
        endpoint: s3.endpoint(),
        ..config
    };
    let store = ObjectStore::new(&config);
    store.ensure_bucket().await.unwrap();
    Server {
        root,
        _s3: s3,
        config,
        store,
    }
}

/// A client of the SDK's own defaults but for `checksums` (`WhenSupported`, the default, adds
/// a CRC32 to every PUT).
fn client(
    config: &StoreConfig,
    checksums: aws_sdk_s3::config::RequestChecksumCalculation,
) -> aws_sdk_s3::Client {
    let s3 = aws_sdk_s3::Config::builder()
        .request_checksum_calculation(checksums)
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(config.region.clone()))
        .endpoint_url(&config.endpoint)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            &config.access_key,
            &config.secret_key,
            None,
            None,
            "test",
        ))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(s3)
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn head(
    client: &aws_sdk_s3::Client,
    config: &StoreConfig,
    key: &str,
) -> aws_sdk_s3::operation::head_object::HeadObjectOutput {
    client
        .head_object()
        .bucket(&config.bucket)
        .key(key)
        .send()
        .await
        .unwrap()
}

/// Bytes that differ at every position, so a misplaced piece shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Files the server left in its root besides the bucket and the objects' side files.
fn leftovers(root: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".tmp.") || name.ends_with(".part"))
        .collect()
}

#[tokio::test]
async fn plain_puts_read_back_whole_with_their_content_type_and_an_etag_per_content() {
    let s = server().await;
    let client = client(&s.config, WhenSupported);
    // Empty, under one piece, exactly one piece, several pieces and a ragged end.
    let sizes = [0, 1, 4096, 1 << 20, (3 << 20) + 12_345];
    let mut e_tags = Vec::new();
    for (i, size) in sizes.into_iter().enumerate() {
        let bytes = pattern(size);
        let key = format!("uploads/{i}/original.jpg");
        s.store
            .put_bytes(&key, bytes.clone().into(), "image/jpeg", &sha256(&bytes))
            .await
            .unwrap();
        let back = s.store.get(&key, u64::MAX).await.unwrap();
        assert_eq!(back.bytes.len(), size, "size of {key}");
        assert!(back.bytes == bytes, "bytes of {key}");
        assert_eq!(back.content_type.as_deref(), Some("image/jpeg"));
        let head = head(&client, &s.config, &key).await;
        assert_eq!(head.content_length(), Some(size as i64));
        assert_eq!(head.content_type(), Some("image/jpeg"));
        e_tags.push(head.e_tag().unwrap().to_owned());
    }
    let mut distinct = e_tags.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), e_tags.len(), "ETags {e_tags:?}");

    // The same bytes again under another key: the same ETag; a streamed file: the same bytes.
    let bytes = pattern(4096);
    s.store
        .put_bytes("again", bytes.clone().into(), "image/jpeg", &sha256(&bytes))
        .await
        .unwrap();
    let head = head(&client, &s.config, "again").await;
    assert_eq!(head.e_tag(), Some(e_tags[2].as_str()));
    // A PUT with a checksum (the SDK's default) is s3s-fs's to check and store.
    client
        .put_object()
        .bucket(&s.config.bucket)
        .key("checksummed")
        .content_type("image/png")
        .body(bytes.clone().into())
        .send()
        .await
        .unwrap();
    let back = s.store.get("checksummed", u64::MAX).await.unwrap();
    assert!(back.bytes == bytes);
    assert_eq!(back.content_type.as_deref(), Some("image/png"));
    let file = tempfile::NamedTempFile::new().unwrap();
    let big = pattern((5 << 20) + 3);
    std::fs::write(file.path(), &big).unwrap();
    s.store
        .put_file("streamed", file.path(), "video/mp4")
        .await
        .unwrap();
    let back = s.store.get("streamed", u64::MAX).await.unwrap();
    assert!(back.bytes == big);
    assert_eq!(back.content_type.as_deref(), Some("video/mp4"));
    let listed = s.store.list("uploads/").await.unwrap();
    assert_eq!(listed.len(), sizes.len(), "{listed:?}");
    assert!(
        leftovers(s.root.path()).is_empty(),
        "{:?}",
        leftovers(s.root.path())
    );
}

#[tokio::test]
async fn a_body_that_does_not_match_its_signed_digest_or_content_md5_is_refused_and_not_stored() {
    let s = server().await;
    let bytes = pattern(300_000);
    let wrong = sha256(b"something else");
    // Under one piece, and over several (written aside before the digest is known).
    for (key, body) in [
        ("uploads/x", bytes.clone()),
        ("uploads/w", pattern(3 << 20)),
    ] {
        let err = s
            .store
            .put_bytes(key, body.into(), "image/jpeg", &wrong)
            .await
            .unwrap_err();
        assert!(!s.store.exists(key).await.unwrap(), "stored anyway: {err}");
    }

    let client = client(&s.config, WhenRequired);
    let refused = client
        .put_object()
        .bucket(&s.config.bucket)
        .key("uploads/y")
        .content_md5("AAAAAAAAAAAAAAAAAAAAAA==")
        .body(bytes.clone().into())
        .send()
        .await;
    let err = refused.unwrap_err();
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&err),
        Some("BadDigest"),
        "{err:?}"
    );
    assert!(!s.store.exists("uploads/y").await.unwrap());
    assert!(
        leftovers(s.root.path()).is_empty(),
        "{:?}",
        leftovers(s.root.path())
    );

    // The store is still fine afterwards.
    s.store
        .put_bytes(
            "uploads/z",
            bytes.clone().into(),
            "image/jpeg",
            &sha256(&bytes),
        )
        .await
        .unwrap();
    assert!(s.store.get("uploads/z", u64::MAX).await.unwrap().bytes == bytes);
}
