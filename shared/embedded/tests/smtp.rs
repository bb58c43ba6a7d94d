//! The embedded SMTP sink as a real client sees it: Python's smtplib sends, `read_maildir` reads
//! back what was stored. A 250 after DATA means the message is in `new/`, so no test waits.

use std::net::SocketAddr;
use std::path::Path;

use mediaflow_embedded::{EmbeddedSmtp, SmtpLimits, read_maildir};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Runs each step (`[method, args...]` of `smtplib.SMTP`) and prints each one's reply.
const CLIENT: &str = r#"
import json, smtplib, sys
replies = []
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as s:
    for method, *args in json.loads(sys.argv[2]):
        if method == "data":
            args = [args[0].encode()]
        try:
            code, text = getattr(s, method)(*args)
        except smtplib.SMTPResponseException as e:
            code, text = e.smtp_code, e.smtp_error
        replies.append([code, text.decode()])
print(json.dumps(replies))
"#;

async fn smtplib(addr: SocketAddr, steps: serde_json::Value) -> Vec<(u16, String)> {
    let python = std::env::var_os("MEDIAFLOW_PYTHON").unwrap_or_else(|| "python3".into());
    let out = tokio::process::Command::new(python)
        .args(["-c", CLIENT, &addr.port().to_string(), &steps.to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "smtplib failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn codes(replies: &[(u16, String)]) -> Vec<u16> {
    replies.iter().map(|(code, _)| *code).collect()
}

/// The stored file's bytes after the envelope lines.
fn stored_message(path: &Path, size: usize) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[bytes.len() - size..].to_vec()
}

const SIGN_UP: &str = "From: Mediaflow <noreply@mediaflow.test>\r\n\
    To: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.test>\r\n\
    Subject: Welcome to mediaflow,\r\n =?UTF-8?B?SsO8cmdlbg==?= =?utf-8?q?!?=\r\n\
    Message-ID: <signup-1@mediaflow.test>\r\n\
    Date: Thu, 14 May 2026 10:00:00 +0000\r\n\
    MIME-Version: 1.0\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    \r\n\
    Your code is 123456.\r\n";

#[tokio::test]
async fn a_plain_message_is_stored_with_its_envelope_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = EmbeddedSmtp::start(dir.path(), 0).await.unwrap();
    let replies = smtplib(
        smtp.addr(),
        json!([
            ["ehlo", "client.test"],
            ["mail", "noreply@mediaflow.test"],
            ["rcpt", "juergen@example.test"],
            ["data", SIGN_UP],
        ]),
    )
    .await;
    assert_eq!(codes(&replies), [250, 250, 250, 250], "{replies:?}");
    for extension in ["8BITMIME", "SMTPUTF8", "PIPELINING", "SIZE 10485760"] {
        assert!(replies[0].1.lines().any(|l| l == extension), "{replies:?}");
    }

    let mails = read_maildir(dir.path()).unwrap();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert!(replies[3].1.ends_with(&mail.id), "{replies:?}");
    assert_eq!(mail.path, dir.path().join(format!("new/{}.eml", mail.id)));
    assert_eq!(mail.mail_from, "noreply@mediaflow.test");
    assert_eq!(mail.rcpt_to, ["juergen@example.test"]);
    assert_eq!(
        mail.from.as_deref(),
        Some("Mediaflow <noreply@mediaflow.test>")
    );
    assert_eq!(
        mail.to.as_deref(),
        Some("Jürgen Müller <juergen@example.test>")
    );
    assert_eq!(
        mail.subject.as_deref(),
        Some("Welcome to mediaflow, Jürgen!")
    );
    assert_eq!(
        mail.message_id.as_deref(),
        Some("<signup-1@mediaflow.test>")
    );
    assert_eq!(
        mail.date.as_deref(),
        Some("Thu, 14 May 2026 10:00:00 +0000")
    );
    assert_eq!(mail.size, SIGN_UP.len());
    assert_eq!(stored_message(&mail.path, mail.size), SIGN_UP.as_bytes());
    let age = mail.received.elapsed().unwrap_or_default();
    assert!(age.as_secs() < 60, "received {age:?} ago");
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );

    let addr = smtp.addr();
    smtp.stop().await;
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test]
async fn lines_starting_with_a_dot_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = EmbeddedSmtp::start(dir.path(), 0).await.unwrap();
    let message = "Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\nlast .\r\n.";
    let replies = smtplib(
        smtp.addr(),
        json!([
            ["ehlo"],
            ["mail", "a@mediaflow.test"],
            ["rcpt", "b@example.test"],
            ["data", message],
        ]),
    )
    .await;
    assert_eq!(codes(&replies), [250, 250, 250, 250], "{replies:?}");

    let mails = read_maildir(dir.path()).unwrap();
    // smtplib ends a message that does not end with CRLF with one.
    let sent = format!("{message}\r\n");
    assert_eq!(
        String::from_utf8(stored_message(&mails[0].path, mails[0].size)).unwrap(),
        sent
    );
}

#[tokio::test]
async fn both_recipients_are_in_the_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = EmbeddedSmtp::start(dir.path(), 0).await.unwrap();
    let replies = smtplib(
        smtp.addr(),
        json!([
            ["helo", "client.test"],
            ["mail", ""],
            ["rcpt", "one@example.test"],
            ["rcpt", "two@example.test"],
            [
                "data",
                "Subject: two\r\nTo: one@example.test\r\n\r\nhello\r\n"
            ],
        ]),
    )
    .await;
    assert_eq!(codes(&replies), [250, 250, 250, 250, 250], "{replies:?}");

    let mails = read_maildir(dir.path()).unwrap();
    assert_eq!(mails[0].mail_from, "", "the null sender");
    assert_eq!(mails[0].rcpt_to, ["one@example.test", "two@example.test"]);
    assert_eq!(mails[0].subject.as_deref(), Some("two"));
}

/// Reads one reply (all its lines) and returns its code.
async fn reply(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> u16 {
    let mut line = String::new();
    loop {
        line.clear();
        assert_ne!(
            reader.read_line(&mut line).await.unwrap(),
            0,
            "connection closed"
        );
        if line.as_bytes().get(3) != Some(&b'-') {
            return line[..3].parse().unwrap();
        }
    }
}

#[tokio::test]
async fn a_message_cut_off_before_its_end_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = EmbeddedSmtp::start(dir.path(), 0).await.unwrap();
    let (reader, mut writer) = TcpStream::connect(smtp.addr()).await.unwrap().into_split();
    let mut reader = BufReader::new(reader);
    assert_eq!(reply(&mut reader).await, 220);
    // Pipelined, as PIPELINING allows: the replies come in order.
    writer
        .write_all(b"EHLO raw.test\r\nMAIL FROM:<a@mediaflow.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        .await
        .unwrap();
    for code in [250, 250, 250, 354] {
        assert_eq!(reply(&mut reader).await, code);
    }
    writer
        .write_all(b"Subject: cut off\r\n\r\nno end\r\n")
        .await
        .unwrap();
    writer.shutdown().await.unwrap();
    // The sink closes its side once it has seen the end of input (and stores nothing).
    let mut rest = String::new();
    assert_eq!(reader.read_line(&mut rest).await.unwrap(), 0, "{rest}");

    assert!(read_maildir(dir.path()).unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = SmtpLimits {
        max_message_bytes: 1024,
        ..SmtpLimits::default()
    };
    let smtp = EmbeddedSmtp::start_with(dir.path(), 0, limits)
        .await
        .unwrap();
    let big = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(2000));
    let replies = smtplib(
        smtp.addr(),
        json!([
            ["ehlo"],
            ["mail", "a@mediaflow.test", ["SIZE=2000"]],
            ["mail", "a@mediaflow.test"],
            ["rcpt", "b@example.test"],
            ["data", big],
            // The connection stays usable and the next message is taken.
            ["mail", "a@mediaflow.test"],
            ["rcpt", "b@example.test"],
            ["data", "Subject: small\r\n\r\nfits\r\n"],
        ]),
    )
    .await;
    assert_eq!(
        codes(&replies),
        [250, 552, 250, 250, 552, 250, 250, 250],
        "{replies:?}"
    );
    assert!(
        replies[0].1.lines().any(|l| l == "SIZE 1024"),
        "{replies:?}"
    );

    let mails = read_maildir(dir.path()).unwrap();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].subject.as_deref(), Some("small"));
}

#[tokio::test]
async fn commands_out_of_order_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = EmbeddedSmtp::start(dir.path(), 0).await.unwrap();
    let replies = smtplib(
        smtp.addr(),
        json!([
            ["docmd", "MAIL FROM:<a@mediaflow.test>"],
            ["ehlo", "client.test"],
            ["rcpt", "b@example.test"],
            ["data", "Subject: too early\r\n\r\n"],
            ["mail", "a@mediaflow.test"],
            ["mail", "a@mediaflow.test"],
            ["data", "Subject: no recipient\r\n\r\n"],
            ["rset"],
            ["rcpt", "b@example.test"],
            ["noop"],
            ["verify", "b@example.test"],
            ["docmd", "EXPN", "list"],
            ["docmd", "FROB"],
            // Past the line limit, and then read from the next line's start again.
            ["docmd", format!("NOOP {}", "x".repeat(1200))],
            ["noop"],
        ]),
    )
    .await;
    assert_eq!(
        codes(&replies),
        [
            503, 250, 503, 503, 250, 503, 503, 250, 503, 250, 252, 502, 500, 500, 250
        ],
        "{replies:?}"
    );
    assert!(read_maildir(dir.path()).unwrap().is_empty());
}
