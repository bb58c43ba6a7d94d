//! The embedded SMTP sink: accepts every message sent to 127.0.0.1 and stores it in a Maildir,
//! so that the mails of a platform on one machine (the sign-up flow's) can be read locally.
//! `read_maildir` reads them back for `mediaflow mail`.

use std::borrow::Cow;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Why the SMTP sink could not start, or its Maildir could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("cannot listen for SMTP on {addr}: {source}; is another mediaflow running?")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} was not stored by the SMTP sink (its first line is not a Return-Path)")]
    NotCaptured { path: PathBuf },
}

/// Limits of the SMTP sink.
#[derive(Debug, Clone)]
pub struct SmtpLimits {
    /// The largest message accepted (advertised as `SIZE`); larger ones get 552.
    pub max_message_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client may stay silent (or not read a reply) before it is disconnected.
    pub idle_timeout: Duration,
}

impl Default for SmtpLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 10 * 1024 * 1024,
            max_connections: 64,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Recipients per message, the minimum RFC 5321 requires a server to accept.
const MAX_RECIPIENTS: usize = 100;
/// The longest command line, CRLF included (RFC 5321's limit for text lines; commands with
/// extension parameters may exceed its 512 for commands).
const COMMAND_MAX: usize = 1000;
/// Message bytes read at a time. Message lines are not held to 1000 octets, only the message to
/// its size: not every mail generator wraps its lines.
const DATA_PIECE: usize = 64 * 1024;
/// How long `stop` lets transactions under way finish.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running SMTP sink. Dropping it stops it as `stop` does, without waiting.
#[derive(Debug)]
pub struct EmbeddedSmtp {
    addr: SocketAddr,
    stop: CancellationToken,
    acceptor: Option<JoinHandle<()>>,
}

impl EmbeddedSmtp {
    /// Serves SMTP on 127.0.0.1:`port` (0 picks a free port) into the Maildir `dir`.
    pub async fn start(dir: &Path, port: u16) -> Result<Self, SmtpError> {
        Self::start_with(dir, port, SmtpLimits::default()).await
    }

    /// `start` with other limits.
    pub async fn start_with(dir: &Path, port: u16, limits: SmtpLimits) -> Result<Self, SmtpError> {
        for sub in ["tmp", "new", "cur"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| SmtpError::Io {
                action: "create",
                path,
                source,
            })?;
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let listen = |source| SmtpError::Listen { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(listen)?;
        let addr = listener.local_addr().map_err(listen)?;
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            limits,
        });
        let acceptor = tokio::spawn(accept(listener, shared, stop.clone()));
        tracing::info!(%addr, dir = %dir.display(), "embedded smtp sink ready");
        Ok(Self {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections, lets transactions under way finish (for a few seconds at
    /// most) and closes every connection.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.await;
        }
    }
}

impl Drop for EmbeddedSmtp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    dir: PathBuf,
    limits: SmtpLimits,
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    let mut sessions = JoinSet::new();
    loop {
        while sessions.try_join_next().is_some() {}
        // A slot first, then a connection: clients beyond the bound wait in the backlog.
        let (permit, accepted) = tokio::select! {
            () = stop.cancelled() => break,
            next = async {
                (permits.clone().acquire_owned().await, listener.accept().await)
            } => next,
        };
        let Ok(permit) = permit else { break }; // never closed
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "smtp accept failed");
                continue;
            }
        };
        let (shared, stop) = (shared.clone(), stop.clone());
        sessions.spawn(async move {
            let _permit = permit;
            if let Err(e) = Session::new(socket, shared).run(&stop).await {
                tracing::debug!(error = %e, %peer, "smtp connection ended");
            }
        });
    }
    drop(listener);
    let drained = async { while sessions.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(STOP_GRACE, drained).await;
}

/// One line read from a client.
enum Input {
    Line(String),
    Bad(&'static str),
    Gone,
}

struct Session {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    shared: Arc<Shared>,
    greeted: bool,
    from: Option<String>,
    rcpts: Vec<String>,
}

impl Session {
    fn new(socket: TcpStream, shared: Arc<Shared>) -> Self {
        let (reader, writer) = socket.into_split();
        Self {
            reader: BufReader::new(reader),
            writer: BufWriter::new(writer),
            shared,
            greeted: false,
            from: None,
            rcpts: Vec::new(),
        }
    }

    async fn run(mut self, stop: &CancellationToken) -> io::Result<()> {
        match self.serve(stop).await {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                self.close("421 4.4.2 idle for too long, closing").await
            }
            done => done,
        }
    }

    async fn serve(&mut self, stop: &CancellationToken) -> io::Result<()> {
        self.reply("220 localhost ESMTP mediaflow mail sink")
            .await?;
        let mut buf = Vec::new();
        loop {
            // A client in the middle of a transaction may finish it when the sink stops.
            let idle = self.from.is_none();
            let input = tokio::select! {
                biased;
                () = stop.cancelled(), if idle => None,
                input = self.read_command(&mut buf) => Some(input?),
            };
            let line = match input {
                None => return self.close("421 4.3.2 shutting down").await,
                Some(Input::Gone) => return Ok(()),
                Some(Input::Bad(reply)) => {
                    self.reply(reply).await?;
                    continue;
                }
                Some(Input::Line(line)) => line,
            };
            let (verb, arg) = line.split_once(' ').unwrap_or((&line, ""));
            let arg = arg.trim();
            let reply: Cow<str> = match verb.to_ascii_uppercase().as_str() {
                "EHLO" | "HELO" if arg.is_empty() => "501 5.5.4 a domain is required".into(),
                "EHLO" => {
                    self.greet();
                    let size = self.shared.limits.max_message_bytes;
                    format!(
                        "250-localhost greets {arg}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
                         250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE {size}"
                    )
                    .into()
                }
                "HELO" => {
                    self.greet();
                    "250 localhost".into()
                }
                "MAIL" => self.mail(arg),
                "RCPT" => self.rcpt(arg),
                "DATA" if !arg.is_empty() => "501 5.5.4 DATA takes no parameters".into(),
                "DATA" if self.rcpts.is_empty() => "503 5.5.1 MAIL and RCPT first".into(),
                "DATA" => {
                    self.reply("354 end data with <CR><LF>.<CR><LF>").await?;
                    let message = self.read_message(&mut buf).await?;
                    let from = self.from.take().unwrap_or_default();
                    let rcpts = std::mem::take(&mut self.rcpts);
                    match message {
                        Some(message) => self.deliver(from, rcpts, message).await.into(),
                        None => format!(
                            "552 5.3.4 message exceeds the size limit of {} bytes",
                            self.shared.limits.max_message_bytes
                        )
                        .into(),
                    }
                }
                "RSET" => {
                    self.from = None;
                    self.rcpts.clear();
                    "250 2.0.0 OK".into()
                }
                "NOOP" => "250 2.0.0 OK".into(),
                "VRFY" => "252 2.5.0 cannot verify, but will accept".into(),
                "QUIT" => return self.close("221 2.0.0 bye").await,
                "EXPN" | "HELP" | "STARTTLS" | "AUTH" | "BDAT" | "ETRN" | "TURN" => {
                    "502 5.5.1 not implemented".into()
                }
                _ => "500 5.5.2 command not recognized".into(),
            };
            self.reply(&reply).await?;
        }
    }

    /// EHLO and HELO start a new session state (RFC 5321 4.1.4).
    fn greet(&mut self) {
        self.greeted = true;
        self.from = None;
        self.rcpts.clear();
    }

    fn mail(&mut self, arg: &str) -> Cow<'static, str> {
        if !self.greeted {
            return "503 5.5.1 EHLO or HELO first".into();
        }
        if self.from.is_some() {
            return "503 5.5.1 a transaction is already under way".into();
        }
        let Some((path, params)) = parse_path(arg, "FROM:") else {
            return "501 5.5.4 syntax: MAIL FROM:<address>".into();
        };
        for param in params.split_whitespace() {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key.to_ascii_uppercase().as_str() {
                "SIZE" => match value.parse::<usize>() {
                    Ok(size) if size > self.shared.limits.max_message_bytes => {
                        return "552 5.3.4 message size exceeds the limit".into();
                    }
                    Ok(_) => {}
                    Err(_) => return "501 5.5.4 bad SIZE".into(),
                },
                "BODY"
                    if ["7BIT", "8BITMIME"]
                        .iter()
                        .any(|b| b.eq_ignore_ascii_case(value)) => {}
                "SMTPUTF8" if value.is_empty() => {}
                _ => return "555 5.5.4 parameter not supported".into(),
            }
        }
        self.from = Some(path.to_owned());
        "250 2.1.0 OK".into()
    }

    fn rcpt(&mut self, arg: &str) -> Cow<'static, str> {
        if self.from.is_none() {
            return "503 5.5.1 MAIL first".into();
        }
        match parse_path(arg, "TO:") {
            None | Some(("", _)) => "501 5.5.4 syntax: RCPT TO:<address>".into(),
            Some((_, params)) if !params.is_empty() => "555 5.5.4 parameter not supported".into(),
            Some(_) if self.rcpts.len() >= MAX_RECIPIENTS => "452 4.5.3 too many recipients".into(),
            Some((path, _)) => {
                self.rcpts.push(path.to_owned());
                "250 2.1.5 OK".into()
            }
        }
    }

    /// The message after a 354, dot-stuffing undone; `None` if it exceeds the size limit. A
    /// client that goes away before the final '.' is an error: nothing is stored.
    async fn read_message(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>> {
        let max = self.shared.limits.max_message_bytes;
        let mut message = Vec::new();
        let mut too_big = false;
        let mut line_start = true;
        loop {
            self.read_piece(buf, DATA_PIECE).await?;
            if buf.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut piece = &buf[..];
            if line_start && piece.first() == Some(&b'.') {
                if piece == b".\r\n" || piece == b".\n" {
                    return Ok((!too_big).then_some(message));
                }
                piece = &piece[1..];
            }
            line_start = buf.ends_with(b"\n");
            // An oversized message is still read to its end, where the client expects a reply.
            too_big = too_big || message.len() + piece.len() > max;
            if !too_big {
                message.extend_from_slice(piece);
            }
        }
    }

    async fn deliver(&self, from: String, rcpts: Vec<String>, message: Vec<u8>) -> String {
        let id = Uuid::now_v7().to_string();
        let dir = self.shared.dir.clone();
        let size = message.len();
        let stored = tokio::task::spawn_blocking({
            let (id, from, rcpts) = (id.clone(), from.clone(), rcpts.clone());
            move || store(&dir, &id, &from, &rcpts, &message)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        match stored {
            Ok(()) => {
                tracing::info!(%id, %from, to = ?rcpts, size, "mail captured");
                format!("250 2.0.0 OK {id}")
            }
            Err(e) => {
                tracing::warn!(error = %e, %from, "could not store a mail");
                "451 4.3.0 could not store the message".into()
            }
        }
    }

    /// The next command line without its line ending.
    async fn read_command(&mut self, buf: &mut Vec<u8>) -> io::Result<Input> {
        self.read_piece(buf, COMMAND_MAX).await?;
        if !buf.ends_with(b"\n") {
            if buf.len() < COMMAND_MAX {
                return Ok(Input::Gone);
            }
            // Skip the rest, so that the next command is read from its start.
            loop {
                self.read_piece(buf, COMMAND_MAX).await?;
                if buf.is_empty() {
                    return Ok(Input::Gone);
                }
                if buf.ends_with(b"\n") {
                    return Ok(Input::Bad("500 5.5.2 line too long"));
                }
            }
        }
        Ok(match std::str::from_utf8(buf) {
            Ok(line) => Input::Line(line.trim_end_matches(['\r', '\n']).to_owned()),
            Err(_) => Input::Bad("500 5.5.2 command is not UTF-8"),
        })
    }

    /// Reads into `buf` up to `max` bytes, through the next LF if it comes first; empty at the
    /// end of input.
    async fn read_piece(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<()> {
        buf.clear();
        // Replies wait while pipelined commands are still buffered, and are sent before
        // waiting for more (RFC 2920).
        if self.reader.buffer().is_empty() {
            timed(&self.shared, self.writer.flush()).await?;
        }
        let mut line = (&mut self.reader).take(max as u64);
        timed(&self.shared, line.read_until(b'\n', buf))
            .await
            .map(drop)
    }

    async fn reply(&mut self, reply: &str) -> io::Result<()> {
        let line = format!("{reply}\r\n");
        timed(&self.shared, self.writer.write_all(line.as_bytes())).await
    }

    async fn close(&mut self, reply: &str) -> io::Result<()> {
        self.reply(reply).await?;
        timed(&self.shared, self.writer.flush()).await
    }
}

async fn timed<T>(shared: &Shared, io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(shared.limits.idle_timeout, io)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// The address of `FROM:<address> params` (keyword as given, any case) and the parameters.
fn parse_path<'a>(arg: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let rest = arg
        .get(..keyword.len())
        .filter(|k| k.eq_ignore_ascii_case(keyword))
        .map(|_| arg[keyword.len()..].trim_start())?;
    let (path, params) = rest.strip_prefix('<')?.split_once('>')?;
    // The address becomes a header line when stored.
    let plain = !path.contains(char::is_control) && (params.is_empty() || params.starts_with(' '));
    plain.then(|| (path, params.trim()))
}

/// Writes the message to `tmp/<id>` and renames it to `new/<id>.eml` once it is on disk, with
/// the envelope on top as a delivering MTA writes it: `Return-Path`, then one `Delivered-To`
/// per recipient.
fn store(dir: &Path, id: &str, from: &str, rcpts: &[String], message: &[u8]) -> io::Result<()> {
    let tmp = dir.join("tmp").join(id);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        write!(file, "Return-Path: <{from}>\r\n")?;
        for rcpt in rcpts {
            write!(file, "Delivered-To: {rcpt}\r\n")?;
        }
        file.write_all(message)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join("new").join(format!("{id}.eml")))?;
        std::fs::File::open(dir.join("new"))?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A message the sink stored, as `read_maildir` reads it.
#[derive(Debug, Clone)]
pub struct CapturedMail {
    /// A UUIDv7: ordered by receipt.
    pub id: String,
    pub path: PathBuf,
    pub received: SystemTime,
    /// The envelope's sender (`MAIL FROM`), empty for the null sender.
    pub mail_from: String,
    /// The envelope's recipients (`RCPT TO`).
    pub rcpt_to: Vec<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub subject: Option<String>,
    pub message_id: Option<String>,
    pub date: Option<String>,
    /// The message's size as received (without the envelope lines).
    pub size: usize,
}

/// The messages in the Maildir `dir` (`new` and `cur`), oldest first; none if it does not exist.
/// `From`, `To` and `Subject` have RFC 2047 encoded-words in UTF-8 or US-ASCII decoded.
pub fn read_maildir(dir: &Path) -> Result<Vec<CapturedMail>, SmtpError> {
    let mut mails = Vec::new();
    for sub in ["new", "cur"] {
        let path = dir.join(sub);
        let failed = |action, path: &Path| {
            let path = path.to_owned();
            move |source| SmtpError::Io {
                action,
                path,
                source,
            }
        };
        let entries = match std::fs::read_dir(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            entries => entries.map_err(failed("list", &path))?,
        };
        for entry in entries {
            let path = entry.map_err(failed("list", &path))?.path();
            // `<id>.eml`, with a mail reader's flags after it in `cur`; anything else is not ours.
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(uuid) = name
                .split_once(".eml")
                .and_then(|(id, _)| Uuid::parse_str(id).ok())
            else {
                continue;
            };
            let bytes = std::fs::read(&path).map_err(failed("read", &path))?;
            mails.push(parse_mail(uuid, path, &bytes)?);
        }
    }
    mails.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(mails)
}

fn parse_mail(uuid: Uuid, path: PathBuf, bytes: &[u8]) -> Result<CapturedMail, SmtpError> {
    let field = |line: &[u8], name: &str| -> Option<String> {
        let line = std::str::from_utf8(line).ok()?.trim_end();
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    };
    let mut lines = bytes.split_inclusive(|&b| b == b'\n').peekable();
    let Some(mail_from) = lines.next().and_then(|l| field(l, "Return-Path")) else {
        return Err(SmtpError::NotCaptured { path });
    };
    let mut rcpt_to = Vec::new();
    while let Some(rcpt) = lines.peek().and_then(|l| field(l, "Delivered-To")) {
        rcpt_to.push(rcpt);
        lines.next();
    }
    let size = lines.clone().map(<[u8]>::len).sum();

    const WANTED: [&str; 5] = ["From", "To", "Subject", "Message-ID", "Date"];
    let mut values: [Option<String>; 5] = Default::default();
    let mut current = None;
    for line in lines {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        // A line starting with white space continues the header before it (unfolding).
        if line.starts_with([' ', '\t']) {
            if let Some(value) = current.and_then(|i: usize| values[i].as_mut()) {
                value.push_str(line);
            }
            continue;
        }
        current = line.split_once(':').and_then(|(name, value)| {
            let i = WANTED
                .iter()
                .position(|w| w.eq_ignore_ascii_case(name.trim()))?;
            // Only the first of a repeated header counts.
            if values[i].is_some() {
                return None;
            }
            values[i] = Some(value.to_owned());
            Some(i)
        });
    }
    let [from, to, subject, message_id, date] = values.map(|v| v.map(|v| v.trim().to_owned()));
    let (secs, nanos) = uuid.get_timestamp().map_or((0, 0), |t| t.to_unix());
    Ok(CapturedMail {
        id: uuid.to_string(),
        path,
        received: SystemTime::UNIX_EPOCH + Duration::new(secs, nanos),
        mail_from: mail_from
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_owned(),
        rcpt_to,
        from: from.map(|v| decode_words(&v)),
        to: to.map(|v| decode_words(&v)),
        subject: subject.map(|v| decode_words(&v)),
        message_id,
        date,
        size,
    })
}

/// Decodes RFC 2047 encoded-words in UTF-8 or US-ASCII (what mail libraries write); any other
/// is left as it is.
fn decode_words(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    let mut after_word = false;
    while let Some(start) = rest.find("=?") {
        let (before, candidate) = rest.split_at(start);
        match decode_word(candidate) {
            Some((text, len)) => {
                // White space between two encoded-words is not part of the text.
                if !(after_word && before.trim().is_empty()) {
                    out.push_str(before);
                }
                out.push_str(&text);
                rest = &candidate[len..];
                after_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &candidate[2..];
                after_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text of the encoded-word `word` starts with, and the word's length.
fn decode_word(word: &str) -> Option<(String, usize)> {
    let (charset, rest) = word.strip_prefix("=?")?.split_once('?')?;
    let (encoding, rest) = rest.split_once('?')?;
    let (text, after) = rest.split_once("?=")?;
    // A language may follow the charset (RFC 2231).
    let charset = charset.split('*').next()?;
    if charset.contains(char::is_whitespace)
        || text.contains(char::is_whitespace)
        || !["utf-8", "us-ascii"]
            .iter()
            .any(|c| c.eq_ignore_ascii_case(charset))
    {
        return None;
    }
    let bytes = match encoding {
        "B" | "b" => base64_simd::STANDARD.decode_to_vec(text).ok()?,
        "Q" | "q" => {
            let mut bytes = Vec::new();
            let mut chars = text.bytes();
            while let Some(b) = chars.next() {
                bytes.push(match b {
                    b'_' => b' ',
                    b'=' => {
                        let hex = [chars.next()?, chars.next()?];
                        u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
                    }
                    b => b,
                });
            }
            bytes
        }
        _ => return None,
    };
    Some((String::from_utf8(bytes).ok()?, word.len() - after.len()))
}
