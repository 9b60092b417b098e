//! After the login: the v3 protocol message by message, every statement
//! judged before it reaches the server and recorded when its result is
//! known.
//!
//! Two halves run side by side. The loop's half reads the loop's messages,
//! classifies each statement with PostgreSQL's parser ([`super::sql`]),
//! judges it, and forwards what is allowed (coalesced: one write per read).
//! For every message that gets an answer it queues what the server owes
//! ([`Expect`]), in order. The server's half reads the server's messages,
//! matches them against that queue to close each statement's record (rows,
//! duration, SQLSTATE), and relays them. A refusal is a message the agent
//! answers itself: it waits in the same queue, so the loop reads it exactly
//! where the server's own error would have been.
//!
//! - Simple `Query`: every statement of the string is judged before any is
//!   sent; if one is refused, none runs: an `ErrorResponse` and a
//!   `ReadyForQuery` with the transaction status unchanged (a refused
//!   statement did not run, so an open transaction stays usable).
//! - Extended protocol: `Parse` is judged (its statement text); a refused
//!   `Parse` gets an `ErrorResponse` and the loop's messages up to its next
//!   `Sync` are discarded, as the server does after an error; the `Sync`
//!   itself is forwarded, so the server's `ReadyForQuery` ends the batch.
//!   `Bind`/`Execute` are recorded against the statement they run.
//! - SQL-level `PREPARE` is judged as what it prepares, and `EXECUTE name`
//!   as the statement prepared under that name.
//! - `FunctionCall` (libpq's large-object calls): the function is looked up
//!   by OID (a catalogue query the agent sends on the same connection, in
//!   the loop's transaction) and judged as a `SELECT` of it.
//! - COPY data, notices, notifications and parameter changes are relayed.
//! - A malformed message from the loop ends the session with a FATAL
//!   `ErrorResponse` (08P01); a malformed one from the server ends it too.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{oneshot, Notify},
};

use super::{
    messages::{self, decode, next_frame, Field, Front, MAX_SERVER_MESSAGE},
    sql::{Classifier, SqlError, Statement},
};
use crate::{
    audit::capture::{CaptureStream, Side},
    kinds::{EventKind, OpKind, Outcome},
    masking::{MaskCache, MaskSpec},
    policy::{Operation, SqlOp, Verdict},
    session::{Event, Judged, Session},
};

/// Answers of the agent's own and answers owed by the server, queued at
/// most: a loop that sends without reading waits here (backpressure)
/// instead of growing the agent's memory.
const MAX_PENDING: usize = 4096;
/// Schemas a session's search paths may name in all.
const MAX_SCHEMAS: usize = 64;
/// How long the agent waits for its own catalogue lookup (FunctionCall).
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the session knows at the start of the relay.
pub(super) struct Start {
    /// The role the agent logged in as (`$user` in a search path).
    pub user: String,
    /// `search_path` from the start-up parameters, if the loop set one.
    pub search_path: Option<String>,
    /// Compiled `mask` lists, shared by the handler's sessions.
    pub masks: Arc<MaskCache>,
    /// The largest message read from the loop, and from the server.
    pub max_message: usize,
    pub max_result_message: usize,
}

/// Relays a logged-in session until either side ends it.
/// Relays a logged-in session until either side ends it. Returns the
/// outcome, and the server connection when the loop left it idle (no
/// transaction, nothing owed, no COPY): a pooled login can take it after a
/// reset.
pub(super) async fn relay<CR, CW, S>(
    s: Arc<Session>,
    classifier: Arc<Classifier>,
    cr: CR,
    cw: CW,
    server: S,
    start: Start,
) -> (Outcome, Option<S>)
where
    CR: AsyncRead + Unpin + Send,
    CW: AsyncWrite + Unpin + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (sr, sw) = tokio::io::split(server);
    let shared = Arc::new(Shared::default());
    // The login ended with ReadyForQuery, idle. Whether this session's
    // results are masked at all: the mask of a plain SELECT.
    let default_mask = {
        let d = s.verdict(Operation::Sql(SqlOp::SELECT));
        (!d.mask.is_empty()).then(|| start.masks.get(&d.mask))
    };
    {
        let mut t = shared.lock();
        t.status = Some(b'I');
        t.settled = true;
        t.session_mask = default_mask.clone();
    }
    // The server searches pg_catalog first, then the path.
    let mut schemas = vec![
        "pg_catalog".to_owned(),
        start.user.clone(),
        "public".to_owned(),
    ];
    if let Some(p) = start.search_path {
        add_schemas(&mut schemas, &split_path(&p), &start.user);
    }
    let max_result_message = start.max_result_message;
    let up = Up {
        s: s.clone(),
        max_message: start.max_message,
        classifier,
        masks: start.masks,
        fallback_mask: default_mask.map(|_| Arc::new(MaskSpec::hide_all())),
        shared: shared.clone(),
        user: start.user,
        schemas,
        prepared: HashMap::new(),
        portals: HashMap::new(),
        sql_prepared: HashMap::new(),
        functions: HashMap::new(),
        decisions: Mutex::default(),
        discarding: false,
        batch_ran: false,
        batch_txn: false,
        copy_sent: false,
        out: Vec::with_capacity(8192),
        capture: s.capture().map(|c| Captured::new(c, Side::Client)),
    };
    let (mut sr, mut sw) = (sr, sw);
    let outcome = {
        let up = up.run(cr, &mut sw);
        let down = down(s.clone(), shared.clone(), &mut sr, cw, max_result_message);
        tokio::pin!(up, down);
        let abort = s.closed().clone();
        let (mut up_done, mut down_done) = (false, false);
        loop {
            if up_done && down_done {
                break None;
            }
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => {
                        up_done = true;
                        // The loop is gone: the server's half ends once
                        // the server owes nothing more.
                        shared.lock().stop = true;
                        shared.wake.notify_one();
                    }
                    Err(o) => {
                        // The FATAL for the loop is written by the server half.
                        if !down_done {
                            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut down).await;
                        }
                        break Some(o);
                    }
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(o) => break Some(o),
                },
                _ = tokio::time::sleep(REUSE_WAIT), if up_done && !down_done => {
                    // The server still owes answers nobody will read.
                    break Some(Outcome::ok());
                }
                _ = abort.cancelled() => break Some(Outcome::Shutdown),
            }
        }
    };
    if let Some(o) = outcome {
        let _ = sw.write_all(&TERMINATE).await;
        let _ = sw.shutdown().await;
        return (o, None);
    }
    let idle = {
        let t = shared.lock();
        t.settled && t.pending.is_empty() && t.status == Some(b'I') && !t.copy_in && !t.server_gone
    };
    if idle {
        return (Outcome::ok(), Some(sr.unsplit(sw)));
    }
    let _ = sw.write_all(&TERMINATE).await;
    let _ = sw.shutdown().await;
    (Outcome::ok(), None)
}

/// A `Terminate` message.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
/// How long the server may take to finish answering a loop that left.
const REUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The queue of answers the server owes, shared by both halves.
#[derive(Default)]
struct Shared {
    track: Mutex<Track>,
    /// The loop's half queued a message of the agent's own.
    wake: Notify,
    /// The server's half took answers off the queue.
    room: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Track {
    pending: VecDeque<Expect>,
    /// The transaction status of the last `ReadyForQuery`.
    status: Option<u8>,
    /// The server sent an error in an extended-protocol batch: it ignores
    /// everything up to the next `Sync`.
    skipping: bool,
    /// A FATAL error for the loop; the session ends once it is written.
    fatal: Option<Vec<u8>>,
    /// The server is in COPY FROM STDIN: it ignores Sync and Flush until
    /// the loop's CopyDone or CopyFail.
    copy_in: bool,
    /// The loop is gone: the server's half stops once nothing is owed.
    stop: bool,
    /// The server closed its side (or sent a FATAL error).
    server_gone: bool,
    /// Parses the server refused or skipped, for the loop's half to undo.
    undo: Vec<Undo>,
    /// The last server message was ReadyForQuery and the loop has sent
    /// nothing since (the connection is idle for certain).
    settled: bool,
    /// The mask of the session's latest masked statement (or of a plain
    /// SELECT when it opened): applied to what arrives outside a result
    /// (notifications, parameter changes, errors and notices, COPY data).
    session_mask: Option<Arc<MaskSpec>>,
    /// The server sent rows no queued message asked for: the agent's view
    /// of the session is wrong, and the session ends.
    lost: bool,
}

/// What the server owes for one message, or an answer of the agent's own.
enum Expect {
    /// What to undo in the agent's map if the server refuses it.
    Parse(Option<Undo>),
    Bind,
    /// Fills the described statement's fields (for masking its results).
    Describe(Option<Slot>),
    Close,
    Execute(Option<Rec>),
    Sync,
    /// A simple query: one record per statement, in order.
    Query(VecDeque<Rec>),
    Function(Rec),
    /// The agent's own catalogue query (a function's name by OID).
    Lookup {
        name: Option<String>,
        reply: Option<oneshot::Sender<Option<String>>>,
    },
    /// The agent's own answer; `ready`: followed by `ReadyForQuery`.
    Local {
        msg: Vec<u8>,
        ready: bool,
    },
    /// The loop ended a COPY FROM STDIN here (CopyDone or CopyFail) before
    /// the server said it started one: the Syncs before it were ignored.
    CopyEnd,
    /// A Parse that fails, sent in place of a refused message so that the
    /// server rolls back its batch's implicit transaction: its error is
    /// replaced by the agent's refusal.
    Refusal(Vec<u8>),
}

impl Expect {
    /// Ends at the server's `ReadyForQuery`.
    fn is_sync_point(&self) -> bool {
        matches!(
            self,
            Expect::Sync | Expect::Query(_) | Expect::Function(_) | Expect::Lookup { .. }
        )
    }
}

/// A Parse the agent entered in its map before the server answered: if the
/// server refuses (or skips) it, the map goes back to what it was.
struct Undo {
    name: String,
    new: Arc<Prepared>,
    previous: Option<Arc<Prepared>>,
}

/// What a `Describe` of a prepared statement answered.
type Slot = Arc<Mutex<Described>>;

#[derive(Default)]
struct Described {
    /// Its result fields (`RowDescription`).
    fields: Option<Vec<Field>>,
    /// Its parameter types (`ParameterDescription`).
    params: Vec<u32>,
}

/// A statement's event, completed when its result arrives, and how its
/// rows are masked.
struct Rec {
    event: Event,
    started: Instant,
    rows: u64,
    /// The SQLSTATE of an error that ends it at `ReadyForQuery`.
    error: Option<String>,
    mask: Option<Arc<MaskSpec>>,
    /// Extended protocol: the statement's fields and the Bind's formats.
    fields: Option<Slot>,
    formats: Vec<i16>,
    plan: Option<Vec<Column>>,
    masked: u64,
    /// A `COPY ... FROM STDIN`.
    copy: bool,
}

/// How one result column is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Keep,
    /// Hidden whole (`****`, a JSON string, or NULL for other types).
    Hide {
        type_oid: u32,
        format: i16,
    },
    /// Value patterns applied inside (text-like values).
    Values {
        type_oid: u32,
        format: i16,
    },
}

/// Longest value the value patterns look into; a longer one is hidden.
const MAX_MASKED_VALUE: usize = 1 << 20;

/// Types whose binary form holds no text (bool, integers, floats, numeric,
/// oid, dates and times, intervals, uuid, money, network addresses).
const SAFE_BINARY: &[u32] = &[
    16, 18, 20, 21, 23, 26, 700, 701, 1700, 1082, 1083, 1114, 1184, 1186, 1266, 2950, 790, 869,
    650, 829, 774,
];

/// Types whose values are their text, in either format (text, varchar,
/// bpchar, name, unknown, xml, json).
const TEXT_LIKE: &[u32] = &[25, 1043, 1042, 19, 705, 142, 114];
const JSON: u32 = 114;
const JSONB: u32 = 3802;

/// The columns' treatment under `spec`. `formats` is the Bind's list (none:
/// all text; one: for all), or the fields' own formats.
fn plan(spec: &MaskSpec, fields: &[Field], formats: Option<&[i16]>) -> Vec<Column> {
    fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let format = match formats {
                None => f.format,
                Some([]) => 0,
                Some([one]) => *one,
                Some(all) => all.get(i).copied().unwrap_or(0),
            };
            if spec.hides(&f.name) {
                Column::Hide {
                    type_oid: f.type_oid,
                    format,
                }
            } else if spec.has_value_patterns() {
                Column::Values {
                    type_oid: f.type_oid,
                    format,
                }
            } else {
                Column::Keep
            }
        })
        .collect()
}

/// A masked `DataRow`, and how many values changed; `None`: unchanged.
fn mask_row(spec: &MaskSpec, plan: &[Column], frame: &[u8]) -> Option<(Vec<u8>, u64)> {
    let values = messages::data_row(frame)?;
    let mut changed = 0;
    let out: Vec<Option<Vec<u8>>> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let Some(v) = v else {
                return None;
            };
            let col = plan.get(i).copied().unwrap_or(Column::Hide {
                type_oid: 0,
                format: 1,
            });
            let masked = match col {
                Column::Keep => None,
                Column::Hide { type_oid, format } => Some(match (type_oid, format) {
                    (JSON, _) | (JSONB, 0) => Some(b"\"****\"".to_vec()),
                    (JSONB, _) => Some(b"\x01\"****\"".to_vec()),
                    (t, _) if TEXT_LIKE.contains(&t) => Some(b"****".to_vec()),
                    // Any other type in text format would have to parse as
                    // that type: NULL instead.
                    _ => None,
                }),
                Column::Values { type_oid, format } => {
                    let (prefix, text) = match (type_oid, format) {
                        (_, 0) => (&[][..], *v),
                        (JSONB, _) if v.first() == Some(&1) => (&v[..1], &v[1..]),
                        (t, _) if TEXT_LIKE.contains(&t) => (&[][..], *v),
                        // Binary numbers, dates and the like hold no text.
                        (t, _) if SAFE_BINARY.contains(&t) => (&[][..], &[][..]),
                        // Arrays, records, bytea, extension types: their
                        // text cannot be looked into here, so it is hidden.
                        _ => {
                            changed += 1;
                            return None;
                        }
                    };
                    if text.len() > MAX_MASKED_VALUE {
                        changed += 1;
                        return None;
                    }
                    match std::str::from_utf8(text) {
                        Ok(t) => spec.mask_text(t).map(|m| {
                            let mut b = prefix.to_vec();
                            b.extend_from_slice(m.as_bytes());
                            Some(b)
                        }),
                        // Text in another client encoding: hidden.
                        Err(_) => Some(None),
                    }
                }
            };
            match masked {
                Some(m) => {
                    changed += 1;
                    m
                }
                None => Some(v.to_vec()),
            }
        })
        .collect();
    (changed > 0).then(|| (messages::build_data_row(&out), changed))
}

impl Rec {
    fn new(event: Event) -> Self {
        Rec {
            event,
            started: Instant::now(),
            rows: 0,
            error: None,
            mask: None,
            fields: None,
            formats: Vec::new(),
            plan: None,
            masked: 0,
            copy: false,
        }
    }

    /// The event with the result: `ok`, `error`, `suspended` or `not_run`.
    fn finish(mut self, result: &str, tag: Option<&str>, sqlstate: Option<&str>) -> Event {
        let rows = tag.and_then(messages::tag_rows).unwrap_or(self.rows);
        let a = &mut self.event.attrs;
        a.push(("result".into(), result.into()));
        if result != "not_run" {
            a.push(("rows".into(), rows.to_string()));
            a.push((
                "duration_us".into(),
                self.started.elapsed().as_micros().to_string(),
            ));
        }
        if let Some(t) = tag {
            a.push(("tag".into(), t.into()));
        }
        if let Some(c) = sqlstate {
            a.push(("sqlstate".into(), c.into()));
        }
        if self.masked > 0 {
            a.push(("masked_values".into(), self.masked.to_string()));
        }
        self.event
    }
}

/// The first bytes of one direction, for replay.
struct Captured {
    stream: CaptureStream,
    left: u64,
}

impl Captured {
    fn new(c: crate::audit::capture::Capture, side: Side) -> Self {
        let left = c.limit;
        Captured {
            stream: CaptureStream::new(c, side),
            left,
        }
    }

    fn push(&mut self, b: &[u8]) {
        if self.left > 0 {
            let n = b
                .len()
                .min(usize::try_from(self.left).unwrap_or(usize::MAX));
            self.stream.push(&b[..n]);
            self.left -= n as u64;
        }
    }
}

/// A statement prepared with `Parse`, for the records of its executions.
struct Prepared {
    /// The event of its (first) statement, judged at `Parse`.
    event: Option<Event>,
    /// Its text and (first) statement, judged again at `Bind` when the
    /// search path has named new schemas since, and with the parameters.
    query: String,
    statement: Option<Statement>,
    schemas: usize,
    /// Its results' mask, and its fields once described.
    mask: Option<Arc<MaskSpec>>,
    fields: Slot,
    /// An `approve` rule matched it: every `Bind` is held, with its
    /// parameters, so a `once` approval covers one execution with the
    /// values the approver saw.
    hold: bool,
    /// The parameter types its `Parse` named.
    types: Vec<u32>,
}

impl Prepared {
    /// Its parameter types: those the `Parse` named, else the server's.
    fn param_types(&self) -> Vec<u32> {
        let described = self
            .fields
            .lock()
            .map(|g| g.params.clone())
            .unwrap_or_default();
        let n = self.types.len().max(described.len());
        (0..n)
            .map(|i| match self.types.get(i) {
                Some(&t) if t != 0 => t,
                _ => described.get(i).copied().unwrap_or(0),
            })
            .collect()
    }
}

/// A portal: its statement and parameters.
struct Portal {
    prepared: Option<Arc<Prepared>>,
    params: Vec<Option<String>>,
    formats: Vec<i16>,
}

/// A judged `Parse`: its first statement's event, the statement, its
/// mask, and whether its executions are held.
type Parsed = (
    Option<Event>,
    Option<Statement>,
    Option<Arc<MaskSpec>>,
    bool,
);

/// The loop's half.
struct Up {
    s: Arc<Session>,
    /// The largest message read from the loop.
    max_message: usize,
    classifier: Arc<Classifier>,
    masks: Arc<MaskCache>,
    /// When this session's results are masked: what hides a result the
    /// agent cannot place (a portal it did not see bound, a FETCH).
    fallback_mask: Option<Arc<MaskSpec>>,
    shared: Arc<Shared>,
    user: String,
    /// Every schema a search path of this session has named: an
    /// unqualified table is each of them (a `SET` rolled back, or one that
    /// failed, still counts; the rules see more tables, never fewer).
    schemas: Vec<String>,
    prepared: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Portal>,
    /// SQL-level `PREPARE`d statements, by name.
    sql_prepared: HashMap<String, (Statement, Option<Arc<MaskSpec>>)>,
    /// Function names by OID (FunctionCall).
    functions: HashMap<u32, String>,
    decisions: Mutex<Decisions>,
    /// A message was refused: the loop's messages up to `Sync` are dropped.
    discarding: bool,
    /// An Execute was forwarded since the last Sync.
    batch_ran: bool,
    /// An Execute of a statement that opens or ends a transaction block
    /// was forwarded since the last Sync: the server's last ReadyForQuery
    /// no longer says whether this batch runs in a block.
    batch_txn: bool,
    /// A `COPY ... FROM STDIN` was forwarded and may still be unanswered.
    copy_sent: bool,
    /// Bytes for the server, written once per read.
    out: Vec<u8>,
    capture: Option<Captured>,
}

/// What the loop's half does after a message.
enum Flow {
    Continue,
    Terminate,
}

impl Up {
    async fn run<R, W>(mut self, mut cr: R, sw: &mut W) -> Result<(), Outcome>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            let n = cr
                .read_buf(&mut buf)
                .await
                .map_err(|e| Outcome::ClientError(format!("reading from the loop: {e}")))?;
            if n == 0 {
                self.flush(sw).await?;
                return Ok(());
            }
            loop {
                let frame = match next_frame(&mut buf, self.max_message) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(self.fatal("08P01", &format!("loopgate: {e}"))),
                };
                match self.message(frame, sw).await? {
                    Flow::Continue => {}
                    Flow::Terminate => {
                        self.flush(sw).await?;
                        return Ok(());
                    }
                }
            }
            self.flush(sw).await?;
        }
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, sw: &mut W) -> Result<(), Outcome> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.shared.lock().settled = false;
        sw.write_all(&self.out)
            .await
            .map_err(|e| Outcome::UpstreamError(format!("writing to the server: {e}")))?;
        self.s
            .counters()
            .up
            .fetch_add(self.out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(c) = &mut self.capture {
            c.push(&self.out);
        }
        self.out.clear();
        Ok(())
    }

    /// Ends the session: a FATAL error for the loop (written by the
    /// server's half, after what is already on its way).
    fn fatal(&self, sqlstate: &str, message: &str) -> Outcome {
        let mut t = self.shared.lock();
        t.fatal = Some(super::wire::error_response(sqlstate, message));
        drop(t);
        self.shared.wake.notify_one();
        Outcome::ClientError(message.to_owned())
    }

    /// Queues what the server owes for a message and forwards it.
    fn forward(&mut self, frame: &[u8], expect: Option<Expect>) {
        if let Some(e) = expect {
            self.shared.lock().pending.push_back(e);
        }
        self.out.extend_from_slice(frame);
    }

    /// Queues an answer of the agent's own.
    fn answer(&mut self, msg: Vec<u8>, ready: bool) {
        let mut t = self.shared.lock();
        let owed = t.pending.iter().any(|e| !matches!(e, Expect::Local { .. }));
        t.pending.push_back(Expect::Local { msg, ready });
        drop(t);
        if owed && !ready {
            // The server answers what came before only when asked to.
            self.out.extend_from_slice(&messages::FLUSH);
        }
        self.shared.wake.notify_one();
    }

    async fn message<W: AsyncWrite + Unpin>(
        &mut self,
        frame: BytesMut,
        sw: &mut W,
    ) -> Result<Flow, Outcome> {
        if self.discarding {
            match frame[0] {
                b'S' => {
                    self.discarding = false;
                    self.batch_ran = false;
                    self.batch_txn = false;
                    self.forward(&frame, Some(Expect::Sync));
                }
                b'X' => return Ok(Flow::Terminate),
                _ => {}
            }
            return Ok(Flow::Continue);
        }
        let msg = match decode(&frame) {
            Ok(m) => m,
            Err(e) => return Err(self.fatal(e.sqlstate(), &format!("loopgate: {e}"))),
        };
        if self.shared.lock().pending.len() >= MAX_PENDING {
            // What is queued for the server must reach it to be answered.
            self.flush(sw).await?;
            self.room().await;
        }
        let copy_in = {
            let mut t = self.shared.lock();
            // Parses the server refused: the map as it was before them.
            for u in std::mem::take(&mut t.undo).into_iter().rev() {
                if self
                    .prepared
                    .get(&u.name)
                    .is_some_and(|p| Arc::ptr_eq(p, &u.new))
                {
                    match u.previous {
                        Some(p) => self.prepared.insert(u.name, p),
                        None => self.prepared.remove(&u.name),
                    };
                }
            }
            t.copy_in
        };
        // A message after a COPY FROM STDIN the server has not answered yet:
        // whether it arrives during the COPY (an error the server skips
        // from) is known once the server answers; until then the loop's half
        // waits.
        let copy_in = if self.copy_sent && !matches!(msg, Front::Copy | Front::Sync | Front::Flush)
        {
            self.flush(sw).await?;
            self.copy_settled().await
        } else {
            copy_in
        };
        if copy_in && !matches!(msg, Front::Copy | Front::Sync | Front::Flush) {
            return Err(self.fatal(
                "08P01",
                "loopgate: a message other than COPY data during COPY FROM STDIN",
            ));
        }
        match msg {
            Front::Query(sql) => self.query(sql, &frame).await,
            Front::Parse { name, query, types } => self.parse(name, query, types, &frame).await,
            Front::Bind {
                portal,
                statement,
                params,
                result_formats,
            } => {
                let prepared = self.prepared.get(statement).cloned().or_else(|| {
                    // A statement prepared with SQL PREPARE, bound by name.
                    let (st, mask) = self.sql_prepared.get(statement)?;
                    let hold = self.s.verdict(Operation::Sql(st.op(&st.text, &[]))).verdict
                        == Verdict::Approve;
                    // Running it prepares nothing.
                    let mut st = st.clone();
                    st.prepares = None;
                    Some(Arc::new(Prepared {
                        event: Some(self.event_of(&st, "prepared with PREPARE")),
                        query: String::new(),
                        statement: Some(st),
                        schemas: self.schemas.len(),
                        mask: mask.clone(),
                        fields: Slot::default(),
                        hold,
                        types: Vec::new(),
                    }))
                });
                // A statement the agent does not know (never judged, or
                // closed or deallocated as far as it saw) is not bound:
                // whatever the server holds under that name, unjudged.
                let Some(prepared) = prepared else {
                    let reason = format!(
                        "prepared statement {statement:?} is not one this session prepared as far as the agent saw"
                    );
                    self.refuse_unjudged(
                        &format!("BIND {statement:?}"),
                        "sql:safety",
                        "26000",
                        &reason,
                    );
                    self.refuse_in_batch("26000", &format!("loopgate: {reason}"));
                    return Ok(Flow::Continue);
                };
                let types = prepared.param_types();
                let read: Vec<(Option<String>, bool)> = params
                    .iter()
                    .enumerate()
                    .map(|(i, p)| messages::read_param(p, types.get(i).copied().unwrap_or(0)))
                    .collect();
                let opaque = read.iter().position(|(_, readable)| !readable);
                let params: Vec<Option<String>> = read.into_iter().map(|(text, _)| text).collect();
                if let Err((code, msg)) = self.bind_judge(&prepared, &params, opaque).await {
                    self.refuse_in_batch(code, &msg);
                    return Ok(Flow::Continue);
                }
                let prepared = Some(prepared);
                self.portals.insert(
                    portal.to_owned(),
                    Portal {
                        prepared,
                        params,
                        formats: result_formats,
                    },
                );
                self.forward(&frame, Some(Expect::Bind));
            }
            Front::Describe { what, name } => {
                let slot = if what == b'S' {
                    self.prepared.get(name).map(|p| p.fields.clone())
                } else {
                    self.portals
                        .get(name)
                        .and_then(|p| p.prepared.as_ref())
                        .map(|p| p.fields.clone())
                };
                self.forward(&frame, Some(Expect::Describe(slot)));
            }
            Front::Execute { portal } => {
                let mut masking = None;
                let known: Option<Event> = self.portals.get(portal).and_then(|p| {
                    let prepared = p.prepared.as_ref()?;
                    let mut event = prepared.event.clone()?;
                    if !p.params.is_empty() {
                        let params = self.params(&p.params, prepared.mask.as_deref());
                        event.attrs.push(("params".into(), params));
                    }
                    if let Some(m) = &prepared.mask {
                        masking = Some((m.clone(), prepared.fields.clone(), p.formats.clone()));
                    }
                    Some(event)
                });
                let placed = known.is_some();
                // Every execution is recorded, even of a portal the agent
                // does not know (the server will say it does not exist).
                let event = known.unwrap_or_else(|| {
                    Event::note(
                        EventKind::Op(OpKind::Sql),
                        format!("EXECUTE portal {portal:?}"),
                        "no statement known for this portal",
                    )
                });
                let mut rec = Rec::new(event);
                match masking {
                    Some((mask, fields, formats)) => {
                        rec.mask = Some(mask);
                        rec.fields = Some(fields);
                        rec.formats = formats;
                    }
                    // A portal the agent did not see bound (a cursor
                    // DECLAREd in SQL), or bound to a statement it cannot
                    // place: every column hidden when masks apply.
                    None if !placed => {
                        rec.mask = self.fallback_mask.clone();
                    }
                    None => {}
                }
                // What the statement changes in the agent's view (PREPARE,
                // DEALLOCATE), once it runs.
                let ran = self
                    .portals
                    .get(portal)
                    .and_then(|p| p.prepared.clone())
                    .filter(|p| p.statement.is_some());
                if let Some(p) = ran {
                    if let Some(st) = &p.statement {
                        self.apply(st, p.mask.clone());
                        self.batch_txn |= st.block.is_some();
                        if st.copy_from_stdin {
                            self.copy_sent = true;
                            rec.copy = true;
                        }
                    }
                }
                self.batch_ran = true;
                self.forward(&frame, Some(Expect::Execute(Some(rec))));
            }
            Front::Close { what, name } => {
                if what == b'S' {
                    self.prepared.remove(name);
                } else {
                    self.portals.remove(name);
                }
                self.forward(&frame, Some(Expect::Close));
            }
            // The server ignores Sync during COPY FROM STDIN.
            Front::Sync if copy_in => self.forward(&frame, None),
            Front::Sync => {
                self.batch_ran = false;
                self.batch_txn = false;
                self.forward(&frame, Some(Expect::Sync));
            }
            Front::Copy if matches!(frame[0], b'c' | b'f') => {
                let mut t = self.shared.lock();
                if t.copy_in {
                    t.copy_in = false;
                } else {
                    t.pending.push_back(Expect::CopyEnd);
                }
                drop(t);
                self.out.extend_from_slice(&frame);
            }
            Front::Flush | Front::Copy => self.forward(&frame, None),
            // Not forwarded: the relay ends the server connection, or hands
            // it to the pool.
            Front::Terminate => return Ok(Flow::Terminate),
            Front::FunctionCall { oid } => self.function_call(oid, &frame, sw).await?,
        }
        Ok(Flow::Continue)
    }

    /// The compiled mask of a decision, if it masks anything.
    fn mask_of(&self, judged: &Judged) -> Option<Arc<MaskSpec>> {
        let list = &judged.decision.mask;
        let spec = (!list.is_empty()).then(|| self.masks.get(list));
        if spec.is_some() {
            self.shared.lock().session_mask = spec.clone();
        }
        spec
    }

    /// A refused Parse or Bind: the loop gets the refusal in the place of
    /// the server's answer and its messages up to Sync are dropped, as the
    /// server does after an error. When statements of this batch already
    /// ran in an implicit transaction, the server must fail too, or its
    /// Sync would commit them: it gets a Parse that fails in the refused
    /// message's place, and the loop gets the refusal in place of that
    /// error. Inside a transaction block the refusal does not abort it.
    fn refuse_in_batch(&mut self, code: &str, message: &str) {
        self.discarding = true;
        let refusal = messages::error(code, message);
        // In a block only by the server's word: its last ReadyForQuery, when
        // every batch before this one is answered and this one opened or
        // ended none. When in doubt the batch fails, as after a server
        // error.
        let in_block = !self.batch_txn && {
            let t = self.shared.lock();
            !t.pending.iter().any(Expect::is_sync_point) && matches!(t.status, Some(b'T' | b'E'))
        };
        if self.batch_ran && !in_block {
            self.forward(&messages::FAILING_PARSE, Some(Expect::Refusal(refusal)));
        } else {
            self.answer(refusal, false);
        }
    }

    /// Waits until the server has answered the COPY FROM STDIN statements
    /// forwarded (it started the COPY, or refused or skipped it); whether
    /// it is now in COPY mode.
    async fn copy_settled(&mut self) -> bool {
        loop {
            let changed = self.shared.room.notified();
            {
                let t = self.shared.lock();
                if t.copy_in {
                    return true;
                }
                let waiting = t.pending.iter().any(|e| match e {
                    Expect::Execute(Some(r)) => r.copy,
                    Expect::Query(recs) => recs.iter().any(|r| r.copy),
                    _ => false,
                });
                if !waiting || t.server_gone {
                    self.copy_sent = false;
                    return false;
                }
            }
            changed.await;
        }
    }

    /// Waits while the queue is full (the loop is not reading).
    async fn room(&self) {
        loop {
            let room = self.shared.room.notified();
            if self.shared.lock().pending.len() < MAX_PENDING {
                return;
            }
            room.await;
        }
    }

    /// The event of a statement judged earlier (SQL `PREPARE`).
    fn event_of(&self, st: &Statement, reason: &str) -> Event {
        Event::note(
            EventKind::Op(OpKind::Sql),
            self.shown(&st.normalized),
            reason,
        )
        .with_attrs(vec![
            ("statement_kind".to_owned(), st.kind.clone()),
            ("fingerprint".to_owned(), st.fingerprint.clone()),
        ])
    }

    /// Text for the audit or an approver, with the session's secrets masked.
    fn shown(&self, text: &str) -> String {
        let mut b = text.as_bytes().to_vec();
        self.s.masker().mask(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    }

    /// A `Bind`: the statement judged again when the search path has named
    /// new schemas since its `Parse`; a statement an `approve` rule matched
    /// held with the bound values (one approval per execution, unless a
    /// grant covers it); rules that read `sql.params` evaluated with them
    /// (a deny refuses the Bind).
    async fn bind_judge(
        &mut self,
        p: &Prepared,
        params: &[Option<String>],
        opaque: Option<usize>,
    ) -> Result<(), (&'static str, String)> {
        let mut hold = p.hold;
        if p.schemas != self.schemas.len() && !p.query.is_empty() {
            let query = p.query.clone();
            hold |= self.parse_judge(&query, false).await?.3;
        }
        let Some(st) = &p.statement else {
            return Ok(());
        };
        // Only a hold, or rules that read the parameters, can decide
        // otherwise now.
        let reads = !params.is_empty() && self.decisions_now().is_some_and(|c| c.reads_params);
        if !hold && !reads {
            return Ok(());
        }
        // Rules read the parameters: one the agent cannot read as the server
        // will is refused, not guessed.
        if let (true, Some(i)) = (reads, opaque) {
            let reason = format!(
                "parameter ${} is in a binary format the agent cannot read, and rules read parameters; send it as text",
                i + 1
            );
            self.refuse_unjudged(&self.shown(&st.normalized), "sql:params", "0A000", &reason);
            return Err(("0A000", format!("loopgate: {reason}")));
        }
        let values: Vec<String> = params
            .iter()
            .map(|v| v.clone().unwrap_or_default())
            .collect();
        let eff = self.effective(st);
        let op = Operation::Sql(eff.op(&st.text, &values));
        let shown_params = self.params(params, p.mask.as_deref());
        let refused = if hold {
            // The approver sees the statement and its values, masked.
            let mut text = self.shown(&st.text);
            if !params.is_empty() {
                text.push_str(&format!("\n-- parameters: {shown_params}"));
            }
            let attrs = vec![
                ("statement_kind".to_owned(), eff.kind.clone()),
                ("fingerprint".to_owned(), st.fingerprint.clone()),
                ("params".to_owned(), shown_params.clone()),
            ];
            let scope = format!("fingerprint:{}", st.fingerprint);
            let judged = self.s.judge(op, &text, &attrs, Some(&scope)).await;
            judged.refused.map(|r| (r.rule_id, r.reason))
        } else {
            let d = self.s.verdict(op);
            (d.verdict == Verdict::Deny).then_some((d.rule_id, d.reason))
        };
        if let Some((rule_id, reason)) = refused {
            let mut event = self.event_of(st, &reason);
            event.verdict = Verdict::Deny;
            event.rule_id = rule_id.clone();
            event.attrs.push(("params".into(), shown_params));
            event.attrs.push(("result".into(), "refused".into()));
            event.attrs.push(("sqlstate".into(), "42501".into()));
            self.s.record(event);
            return Err(("42501", refusal_message(&rule_id, &reason)));
        }
        Ok(())
    }

    /// Records a refusal the agent makes before any rule (counted as a
    /// decision).
    fn refuse_unjudged(&self, text: &str, rule_id: &str, sqlstate: &str, reason: &str) {
        self.s.refuse(
            EventKind::Op(OpKind::Sql),
            text,
            &crate::kinds::Refusal::new(rule_id, reason.to_owned()),
            vec![
                ("result".into(), "refused".into()),
                ("sqlstate".into(), sqlstate.into()),
            ],
        );
    }

    /// Parameters for the record and an approver: the session's secrets
    /// and the values the statement's mask matches hidden, as a JSON list.
    fn params(&self, params: &[Option<String>], mask: Option<&MaskSpec>) -> String {
        let masker = self.s.masker();
        let v: Vec<serde_json::Value> = params
            .iter()
            .map(|p| match p {
                None => serde_json::Value::Null,
                Some(p) => {
                    let mut b = p.clone().into_bytes();
                    masker.mask(&mut b);
                    let mut text = String::from_utf8_lossy(&b).into_owned();
                    if let Some(m) = mask.and_then(|m| m.mask_text(&text)) {
                        text = m;
                    }
                    serde_json::Value::String(text)
                }
            })
            .collect();
        serde_json::Value::Array(v).to_string()
    }

    /// Classifies a query string with the session's search path; a string
    /// that changes the search path is classified with the new schemas too.
    fn classify(&mut self, sql: &str) -> super::sql::Classified {
        let c = self.classifier.classify(sql, &self.schemas);
        if let Ok(stmts) = &*c {
            let before = self.schemas.len();
            for st in stmts {
                if let Some(p) = &st.search_path {
                    add_schemas(&mut self.schemas, p, &self.user);
                }
            }
            if self.schemas.len() != before {
                return self.classifier.classify(sql, &self.schemas);
            }
        }
        c
    }

    /// The statement a rule judges: `EXECUTE name` is the statement
    /// prepared under that name.
    fn effective<'a>(&'a self, st: &'a Statement) -> &'a Statement {
        st.executes
            .as_ref()
            .and_then(|n| {
                self.sql_prepared
                    .get(n)
                    .map(|(st, _)| st)
                    .or_else(|| self.prepared.get(n).and_then(|p| p.statement.as_ref()))
            })
            .unwrap_or(st)
    }

    /// The agent's own checks, before any rule: what would make its reading
    /// of later statements wrong.
    fn safety(&self, st: &Statement) -> Option<String> {
        // `effective` found no statement under this name: one the agent did
        // not judge (or one it saw go) cannot be run.
        if let Some(name) = &st.executes {
            return Some(format!(
                "EXECUTE of {name:?}, which is not a statement prepared in this session as far as the agent saw"
            ));
        }
        if let Some(p) = &st.search_path {
            if p.iter().any(|s| s == "?") {
                return Some(
                    "a search_path computed at run time cannot be followed; set it with constants"
                        .into(),
                );
            }
            if self.schemas.len() > MAX_SCHEMAS {
                return Some(format!(
                    "search paths of this session named more than {MAX_SCHEMAS} schemas"
                ));
            }
        }
        if st.writes.iter().any(|w| w == "pg_catalog.pg_settings") {
            return Some(
                "writing pg_settings changes settings out of the rules' sight; use SET".into(),
            );
        }
        None
    }

    /// Judges a statement. With `hold` false an `approve` verdict is not
    /// held here: the caller holds it later (at `Bind`, with the values).
    async fn judge(&self, st: &Statement, hold: bool) -> (Judged, Event) {
        let eff = self.effective(st);
        if let Some(reason) = self.safety(eff) {
            let judged = Judged::refusal(crate::kinds::Refusal::new("sql:safety", reason));
            let event = judged.event(
                EventKind::Op(OpKind::Sql),
                self.shown(&st.normalized),
                vec![("statement_kind".to_owned(), eff.kind.clone())],
            );
            return (judged, event);
        }
        let op = Operation::Sql(eff.op(&st.text, &[]));
        // An approver sees the statement as written (secrets masked); the
        // audit gets it with its constants replaced.
        let attrs = vec![
            ("statement_kind".to_owned(), eff.kind.clone()),
            ("fingerprint".to_owned(), st.fingerprint.clone()),
        ];
        let judged = match self.cached(eff) {
            Some(j) => j,
            None if !hold => {
                let judged = Judged::unheld(self.s.verdict(op));
                self.remember(eff, &judged);
                judged
            }
            None => {
                // A duration grant covers statements of this shape only.
                let scope = format!("fingerprint:{}", st.fingerprint);
                let judged = self
                    .s
                    .judge(op, &self.shown(&st.text), &attrs, Some(&scope))
                    .await;
                self.remember(eff, &judged);
                judged
            }
        };
        let event = judged.event(
            EventKind::Op(OpKind::Sql),
            self.shown(&st.normalized),
            attrs,
        );
        (judged, event)
    }

    /// The session's decisions, emptied when the policy changed, with what
    /// the policy's conditions read (checked once per policy, not per
    /// statement).
    fn decisions_now(&self) -> Option<MutexGuard<'_, Decisions>> {
        let policy = self.s.policy_now();
        let mut c = self.decisions.lock().ok()?;
        if !c.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, &policy)) {
            c.reads_params = policy.conditions_mention("params");
            c.reusable = !policy.conditions_mention("text") && !c.reads_params;
            c.policy = Some(policy);
            c.by_shape.clear();
        }
        Some(c)
    }

    /// A decision made earlier for a statement the rules see the same way
    /// (same kind, tables, writes, functions, settings, flags), under the
    /// same policy, when no rule reads the text or the parameters. Holds are
    /// never reused: each `approve` asks again.
    fn cached(&self, st: &Statement) -> Option<Judged> {
        let c = self.decisions_now()?;
        if !c.reusable {
            return None;
        }
        let (seen, decision) = c.by_shape.get(&shape_hash(st))?;
        if !same_shape(seen, st) {
            return None;
        }
        let decision = decision.clone();
        drop(c);
        self.s
            .metrics()
            .decision(decision.verdict.as_str(), &decision.rule_id);
        Some(Judged::unheld(decision))
    }

    fn remember(&self, st: &Statement, judged: &Judged) {
        if judged.decision.verdict == Verdict::Approve {
            return;
        }
        if let Ok(mut c) = self.decisions.lock() {
            if c.reusable && c.policy.is_some() {
                if c.by_shape.len() >= 1024 {
                    c.by_shape.clear();
                }
                c.by_shape
                    .insert(shape_hash(st), (st.clone(), judged.decision.clone()));
            }
        }
    }

    /// What an allowed statement changes in the agent's view of the session.
    fn apply(&mut self, st: &Statement, mask: Option<Arc<MaskSpec>>) {
        if let Some(name) = &st.prepares {
            // A name in use is the server's error: it keeps the first.
            if !self.prepared.contains_key(name) && !self.sql_prepared.contains_key(name) {
                self.sql_prepared.insert(name.clone(), (st.clone(), mask));
            }
        }
        // One namespace on the server: DEALLOCATE (and DISCARD ALL) drop
        // protocol-level statements too.
        match &st.deallocates {
            Some(Some(name)) => {
                self.sql_prepared.remove(name);
                self.prepared.remove(name);
            }
            Some(None) => {
                self.sql_prepared.clear();
                self.prepared.clear();
            }
            None => {}
        }
    }

    /// Records a statement that never reached the parser's approval.
    fn not_classified(&self, text: &str, e: &SqlError) -> (&'static str, String) {
        let sqlstate = e.sqlstate();
        let message = match e {
            SqlError::Syntax(m) => m.clone(),
            other => format!("loopgate: {other}"),
        };
        let mut shown = text.chars().take(200).collect::<String>().into_bytes();
        self.s.masker().mask(&mut shown);
        self.s.record(
            Event {
                kind: EventKind::Op(OpKind::Sql),
                text: String::from_utf8_lossy(&shown).into_owned(),
                verdict: Verdict::Deny,
                rule_id: "sql:parse".into(),
                reason: message.clone(),
                attrs: Vec::new(),
            }
            .with_attrs(vec![
                ("result".into(), "refused".into()),
                ("sqlstate".into(), sqlstate.into()),
            ]),
        );
        (sqlstate, message)
    }

    async fn query(&mut self, sql: &str, frame: &[u8]) {
        let classified = self.classify(sql);
        let stmts = match &*classified {
            Ok(v) => v,
            Err(e) => {
                let (code, message) = self.not_classified(sql, e);
                self.answer(messages::error(code, &message), true);
                return;
            }
        };
        let mut recs = VecDeque::with_capacity(stmts.len());
        for (i, st) in stmts.iter().enumerate() {
            let (judged, mut event) = self.judge(st, true).await;
            if let Some(r) = &judged.refused {
                event.attrs.push(("result".into(), "refused".into()));
                event.attrs.push(("sqlstate".into(), "42501".into()));
                self.s.record(event);
                // None of the string runs.
                for rec in recs {
                    let Rec { mut event, .. } = rec;
                    event.attrs.push(("result".into(), "not_run".into()));
                    event.reason =
                        format!("statement {} of the same query string was refused", i + 1);
                    self.s.record(event);
                }
                let msg = refusal_message(&r.rule_id, &r.reason);
                self.answer(messages::error("42501", &msg), true);
                return;
            }
            let mut rec = Rec::new(event);
            rec.mask = self.mask_of(&judged);
            if rec.mask.is_none() && matches!(st.kind.as_str(), "fetch" | "execute") {
                // Rows of a cursor or a prepared statement judged earlier.
                let name = st.executes.as_ref();
                rec.mask = match (
                    name.and_then(|n| self.sql_prepared.get(n)),
                    name.and_then(|n| self.prepared.get(n)),
                ) {
                    (Some((_, m)), _) => m.clone(),
                    (None, Some(p)) => p.mask.clone(),
                    (None, None) => self.fallback_mask.clone(),
                };
            }
            recs.push_back(rec);
        }
        for (st, rec) in stmts.iter().zip(recs.iter_mut()) {
            let mask = rec.mask.clone();
            self.apply(st, mask);
            if st.copy_from_stdin {
                rec.copy = true;
                self.copy_sent = true;
            }
        }
        self.forward(frame, Some(Expect::Query(recs)));
    }

    /// Classifies and judges a `Parse` text: the event and statement of
    /// its first statement, its mask, and whether an `approve` rule holds
    /// its executions; or the refusal for the loop (recorded).
    async fn parse_judge(
        &mut self,
        query: &str,
        hold: bool,
    ) -> Result<Parsed, (&'static str, String)> {
        let classified = self.classify(query);
        let stmts = match &*classified {
            Ok(v) => v,
            Err(e) => return Err(self.not_classified(query, e)),
        };
        let mut first = None;
        let mut held = false;
        for st in stmts {
            let (judged, mut event) = self.judge(st, hold).await;
            held |= judged.decision.verdict == Verdict::Approve;
            if let Some(r) = &judged.refused {
                event.attrs.push(("result".into(), "refused".into()));
                event.attrs.push(("sqlstate".into(), "42501".into()));
                self.s.record(event);
                return Err(("42501", refusal_message(&r.rule_id, &r.reason)));
            }
            if first.is_none() {
                first = Some((event, st.clone(), self.mask_of(&judged)));
            }
        }
        Ok(match first {
            Some((e, st, mask)) => (Some(e), Some(st), mask, held),
            None => (None, None, None, held),
        })
    }

    async fn parse(&mut self, name: &str, query: &str, types: Vec<u32>, frame: &[u8]) {
        let (event, statement, mask, hold) = match self.parse_judge(query, false).await {
            Ok(v) => v,
            Err((code, message)) => {
                self.refuse_in_batch(code, &message);
                return;
            }
        };
        // A name in use (by Parse or by SQL PREPARE: one namespace on the
        // server) is the server's error: it keeps the first.
        let mut undo = None;
        if name.is_empty()
            || !(self.prepared.contains_key(name) || self.sql_prepared.contains_key(name))
        {
            let new = Arc::new(Prepared {
                event,
                query: query.to_owned(),
                statement,
                schemas: self.schemas.len(),
                mask,
                fields: Slot::default(),
                hold,
                types,
            });
            let previous = self.prepared.insert(name.to_owned(), new.clone());
            undo = Some(Undo {
                name: name.to_owned(),
                new,
                previous,
            });
        }
        self.forward(frame, Some(Expect::Parse(undo)));
    }

    async fn function_call<W: AsyncWrite + Unpin>(
        &mut self,
        oid: u32,
        frame: &[u8],
        sw: &mut W,
    ) -> Result<(), Outcome> {
        if !self.shared.lock().pending.is_empty() {
            let msg = "loopgate: a FunctionCall while other messages await their answers is not supported";
            self.answer(messages::error("0A000", msg), true);
            return Ok(());
        }
        let name = match self.functions.get(&oid) {
            Some(n) => Some(n.clone()),
            None => {
                let (tx, rx) = oneshot::channel();
                // Operators and casts spelled out from pg_catalog: the loop's
                // search path cannot lend them another meaning.
                self.forward(
                    &messages::query(&format!(
                        "SELECT n.nspname::pg_catalog.text, p.proname::pg_catalog.text \
                         FROM pg_catalog.pg_proc p, pg_catalog.pg_namespace n \
                         WHERE p.oid OPERATOR(pg_catalog.=) {oid}::pg_catalog.oid \
                         AND n.oid OPERATOR(pg_catalog.=) p.pronamespace"
                    )),
                    Some(Expect::Lookup {
                        name: None,
                        reply: Some(tx),
                    }),
                );
                self.flush(sw).await?;
                let name = tokio::time::timeout(LOOKUP_TIMEOUT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten();
                if let Some(n) = &name {
                    self.functions.insert(oid, n.clone());
                }
                name
            }
        };
        let Some(name) = name else {
            let msg = format!("loopgate: function call refused: no function has OID {oid}");
            self.answer(messages::error("42883", &msg), true);
            return Ok(());
        };
        let st = Statement {
            text: format!("SELECT {name}(...)"),
            kind: "select".into(),
            functions: vec![name.clone()],
            normalized: format!("SELECT {name}(...)"),
            ..Statement::default()
        };
        let (judged, mut event) = self.judge(&st, true).await;
        event.attrs.push(("function_oid".into(), oid.to_string()));
        if let Some(r) = &judged.refused {
            event.attrs.push(("result".into(), "refused".into()));
            self.s.record(event);
            let msg = refusal_message(&r.rule_id, &r.reason);
            self.answer(messages::error("42501", &msg), true);
            return Ok(());
        }
        self.forward(frame, Some(Expect::Function(Rec::new(event))));
        Ok(())
    }
}

/// Decisions of a session by statement shape ([`Up::cached`]).
#[derive(Default)]
struct Decisions {
    policy: Option<Arc<crate::policy::Policy>>,
    reusable: bool,
    /// A condition names the bound parameters.
    reads_params: bool,
    by_shape: HashMap<u64, (Statement, crate::policy::Decision)>,
}

/// A hash of what the rules see of a statement (not its text).
fn shape_hash(st: &Statement) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &st.kind,
        &st.tables,
        &st.writes,
        st.unbounded,
        &st.functions,
        st.program,
        st.server_file,
        &st.settings,
    )
        .hash(&mut h);
    h.finish()
}

fn same_shape(a: &Statement, b: &Statement) -> bool {
    a.kind == b.kind
        && a.tables == b.tables
        && a.writes == b.writes
        && a.unbounded == b.unbounded
        && a.functions == b.functions
        && a.program == b.program
        && a.server_file == b.server_file
        && a.settings == b.settings
}

/// The loop's view of a refusal (SQLSTATE 42501).
fn refusal_message(rule: &str, reason: &str) -> String {
    format!("loopgate: statement refused by rule {rule}: {reason}")
}

/// A search path value as one entry (`add_schemas` splits it).
fn split_path(p: &str) -> Vec<String> {
    vec![p.to_owned()]
}

/// Adds the schemas of a search path value. The server splits a value on
/// commas and folds unquoted names to lower case; a value can be a quoted
/// name or a string, which the parse does not tell apart, so both spellings
/// are added (more schemas make rules see more tables, never fewer).
fn add_schemas(schemas: &mut Vec<String>, path: &[String], user: &str) {
    for value in path {
        for part in value.split(',') {
            let part = part.trim();
            let names = match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
                Some(quoted) => vec![quoted.replace("\"\"", "\"")],
                None => vec![part.to_owned(), part.to_lowercase()],
            };
            for n in names {
                let n = if n == "$user" { user.to_owned() } else { n };
                if n.is_empty() || n == "?" || schemas.len() > MAX_SCHEMAS {
                    continue;
                }
                if !schemas.contains(&n) {
                    schemas.push(n);
                }
            }
        }
    }
}

/// The server's half: relays the server's messages, closing the records
/// of the statements they answer, and writes the agent's own answers where
/// they belong.
async fn down<R, W>(
    s: Arc<Session>,
    shared: Arc<Shared>,
    sr: &mut R,
    mut cw: W,
    max_message: usize,
) -> Result<(), Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut events = Vec::new();
    let mut capture = s.capture().map(|c| Captured::new(c, Side::Upstream));
    let mut eof = false;
    loop {
        let woken = tokio::select! {
            r = sr.read_buf(&mut buf), if !eof => {
                let n = r.map_err(|e| Outcome::UpstreamError(format!("reading from the server: {e}")))?;
                if n == 0 {
                    eof = true;
                }
                false
            }
            _ = shared.wake.notified() => true,
        };
        let mut fatal = None;
        let mut bad = None;
        let mut lost = false;
        let mut done = false;
        {
            let mut t = shared.lock();
            if eof {
                t.server_gone = true;
            }
            drain(&mut t, &mut out);
            if !woken {
                loop {
                    match next_frame(&mut buf, max_message) {
                        Ok(Some(f)) => {
                            on_server(&mut t, &f, &mut out, &mut events);
                            drain(&mut t, &mut out);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            bad = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(f) = t.fatal.take() {
                fatal = Some(f);
            }
            if t.lost && bad.is_none() {
                lost = true;
            }
            if t.stop && t.pending.is_empty() {
                done = true;
            }
        }
        shared.room.notify_waiters();
        for e in events.drain(..) {
            s.record(e);
        }
        if let Some(f) = &fatal {
            out.extend_from_slice(f);
        }
        if let Some(e) = &bad {
            out.extend_from_slice(&super::wire::error_response(
                "08P01",
                &format!("loopgate: the server sent a message it cannot relay: {e}"),
            ));
            tracing::warn!(session = %s.id(), error = %e, "a message from the PostgreSQL server it cannot relay");
        }
        if !out.is_empty() {
            cw.write_all(&out)
                .await
                .map_err(|e| Outcome::ClientError(format!("writing to the loop: {e}")))?;
            s.counters()
                .down
                .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if let Some(c) = &mut capture {
                c.push(&out);
            }
            out.clear();
        }
        if let Some(e) = bad {
            let _ = cw.shutdown().await;
            return Err(Outcome::UpstreamError(format!(
                "the server sent a message it cannot relay: {e}"
            )));
        }
        if lost {
            tracing::warn!(session = %s.id(), "the PostgreSQL server's answers no longer match the loop's messages; session ended");
            let _ = cw
                .write_all(&super::wire::error_response(
                    "08P01",
                    "loopgate: the server's answers no longer match this session's messages",
                ))
                .await;
            let _ = cw.shutdown().await;
            return Err(Outcome::UpstreamError(
                "the server's answers no longer matched the loop's messages".into(),
            ));
        }
        if fatal.is_some() {
            let _ = cw.shutdown().await;
            return Ok(());
        }
        if done {
            return Ok(());
        }
        if eof {
            let _ = cw.shutdown().await;
            // Answers of the agent's own still owed are moot now.
            return Ok(());
        }
    }
}

/// Writes the agent's own answers at the head of the queue.
fn drain(t: &mut Track, out: &mut Vec<u8>) {
    while matches!(
        t.pending.front(),
        Some(Expect::Local { .. } | Expect::CopyEnd)
    ) {
        let Some(Expect::Local { msg, ready }) = t.pending.pop_front() else {
            continue;
        };
        // After a server error in an extended-protocol batch the server
        // ignores everything up to Sync, simple queries included: so does
        // the agent.
        if t.skipping {
            continue;
        }
        out.extend_from_slice(&msg);
        if ready {
            out.extend_from_slice(&messages::ready(t.status.unwrap_or(b'I')));
        }
    }
}

/// Takes an entry off the queue that will get no answer: its record says
/// it did not run, and a lookup learns nothing.
fn unanswered(e: Expect, events: &mut Vec<Event>, undo: &mut Vec<Undo>) {
    match e {
        Expect::Parse(Some(u)) => undo.push(u),
        Expect::Query(recs) => {
            events.extend(recs.into_iter().map(|r| r.finish("not_run", None, None)))
        }
        Expect::Function(r) | Expect::Execute(Some(r)) => {
            events.push(r.finish("not_run", None, None))
        }
        Expect::Lookup {
            reply: Some(reply), ..
        } => {
            let _ = reply.send(None);
        }
        _ => {}
    }
}

/// One server message: matched against the queue, then relayed (the
/// agent's own lookups are not).
fn on_server(t: &mut Track, f: &[u8], out: &mut Vec<u8>, events: &mut Vec<Event>) {
    let kind = f[0];
    if kind == b'Z' {
        t.settled = true;
    }
    let masked = if matches!(kind, b'E' | b'N' | b'A' | b'S' | b'd' | b'V') {
        mask_other(t, f)
    } else {
        None
    };
    if matches!(t.pending.front(), Some(Expect::Lookup { .. })) {
        match kind {
            b'D' => {
                if let Some(Expect::Lookup { name, .. }) = t.pending.front_mut() {
                    if let [Some(schema), Some(function)] = &messages::columns(f)[..] {
                        *name = Some(format!("{schema}.{function}"));
                    }
                }
            }
            b'Z' => {
                t.status = f.get(5).copied();
                if let Some(Expect::Lookup {
                    name,
                    reply: Some(r),
                }) = t.pending.pop_front()
                {
                    let _ = r.send(name);
                }
            }
            b'T' | b'C' | b'E' | b'N' => {}
            _ => out.extend_from_slice(f),
        }
        return;
    }
    match kind {
        b'Z' => {
            t.status = f.get(5).copied();
            // While skipping, only the Sync gets this answer.
            let skipping = t.skipping;
            while let Some(e) = t.pending.pop_front() {
                let done = if skipping {
                    matches!(e, Expect::Sync)
                } else {
                    e.is_sync_point()
                };
                match e {
                    Expect::Function(r) if done => {
                        let error = r.error.clone();
                        events.push(match error {
                            Some(code) => r.finish("error", None, Some(&code)),
                            None => r.finish("ok", None, None),
                        });
                    }
                    other => {
                        let mut undo = std::mem::take(&mut t.undo);
                        unanswered(other, events, &mut undo);
                        t.undo = undo;
                    }
                }
                if done {
                    break;
                }
            }
            t.skipping = false;
        }
        b'G' => {
            // COPY FROM STDIN: the server ignores Syncs until the loop's
            // CopyDone or CopyFail, which may already be queued.
            let end = t.pending.iter().position(|e| matches!(e, Expect::CopyEnd));
            let upto = end.unwrap_or(t.pending.len());
            let mut i = 1;
            let mut upto = upto;
            while i < upto {
                if matches!(t.pending[i], Expect::Sync) {
                    t.pending.remove(i);
                    upto -= 1;
                } else {
                    i += 1;
                }
            }
            match end {
                Some(_) => {
                    t.pending.remove(upto);
                }
                None => t.copy_in = true,
            }
        }
        b'E' => {
            let code = messages::error_field(f, b'C').map(str::to_owned);
            if matches!(messages::error_field(f, b'V'), Some("FATAL" | "PANIC")) {
                t.server_gone = true;
            }
            if let Some(Expect::Refusal(_)) = t.pending.front() {
                if let Some(Expect::Refusal(refusal)) = t.pending.pop_front() {
                    out.extend_from_slice(&refusal);
                }
                skip_to_sync(t, events);
                return;
            }
            match t.pending.front_mut() {
                Some(Expect::Query(recs)) => {
                    if let Some(r) = recs.pop_front() {
                        events.push(r.finish("error", None, code.as_deref()));
                    }
                }
                Some(Expect::Function(r)) => r.error = code,
                Some(_) => {
                    // The extended protocol: this message failed, and the
                    // server ignores everything up to the next Sync.
                    match t.pending.pop_front() {
                        Some(Expect::Execute(Some(r))) => {
                            events.push(r.finish("error", None, code.as_deref()))
                        }
                        // The server did not create it.
                        Some(Expect::Parse(Some(u))) => t.undo.push(u),
                        _ => {}
                    }
                    skip_to_sync(t, events);
                }
                None => {}
            }
        }
        b'1' => pop_if(t, |e| matches!(e, Expect::Parse(_))),
        b'2' => pop_if(t, |e| matches!(e, Expect::Bind)),
        b'3' => pop_if(t, |e| matches!(e, Expect::Close)),
        b'n' => pop_if(t, |e| matches!(e, Expect::Describe(_))),
        // A statement's parameter types, before its RowDescription or NoData.
        b't' => {
            if let Some(Expect::Describe(Some(slot))) = t.pending.front() {
                if let (Some(types), Ok(mut g)) = (messages::parameter_description(f), slot.lock())
                {
                    g.params = types;
                }
            }
        }
        b'T' => match t.pending.front_mut() {
            Some(Expect::Describe(slot)) => {
                if let (Some(slot), Some(fields)) = (slot, messages::row_description(f)) {
                    if let Ok(mut g) = slot.lock() {
                        g.fields = Some(fields);
                    }
                }
                t.pending.pop_front();
            }
            Some(Expect::Query(recs)) => {
                // A new result set of the current statement.
                if let Some(r) = recs.front_mut() {
                    if let Some(spec) = &r.mask {
                        let fields = messages::row_description(f).unwrap_or_default();
                        r.plan = Some(plan(spec, &fields, None));
                    }
                }
            }
            _ => {}
        },
        // COPY data nobody queued: not relayed (it could not be masked).
        b'd' if !matches!(
            t.pending.front(),
            Some(Expect::Execute(_) | Expect::Query(_))
        ) =>
        {
            t.lost = true;
            return;
        }
        b'D' => {
            let rec = match t.pending.front_mut() {
                Some(Expect::Execute(Some(r))) => Some(r),
                Some(Expect::Query(recs)) => recs.front_mut(),
                _ => None,
            };
            let Some(r) = rec else {
                // Rows nobody queued: not relayed (they could not be masked).
                t.lost = true;
                return;
            };
            {
                r.rows += 1;
                if let Some(spec) = r.mask.clone() {
                    if r.plan.is_none() {
                        let fields = r
                            .fields
                            .as_ref()
                            .and_then(|s| s.lock().ok().and_then(|g| g.fields.clone()));
                        r.plan = Some(match fields {
                            Some(fields) => plan(&spec, &fields, Some(&r.formats)),
                            // Never described: every column hidden (fail
                            // closed; drivers describe what they run).
                            None => Vec::new(),
                        });
                    }
                    if let Some((row, n)) = mask_row(&spec, r.plan.as_deref().unwrap_or(&[]), f) {
                        r.masked += n;
                        out.extend_from_slice(&row);
                        return;
                    }
                }
            }
        }
        b'C' | b'I' | b's' => {
            let tag = (kind == b'C').then(|| messages::command_tag(f));
            let result = if kind == b's' { "suspended" } else { "ok" };
            match t.pending.front_mut() {
                Some(Expect::Query(recs)) => {
                    if let Some(r) = recs.pop_front() {
                        events.push(r.finish(result, tag, None));
                    }
                }
                Some(Expect::Execute(_)) => {
                    if let Some(Expect::Execute(Some(r))) = t.pending.pop_front() {
                        events.push(r.finish(result, tag, None));
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
    out.extend_from_slice(masked.as_deref().unwrap_or(f));
}

/// After an error in an extended-protocol batch: the server ignores
/// everything up to the next Sync.
fn skip_to_sync(t: &mut Track, events: &mut Vec<Event>) {
    t.skipping = true;
    t.copy_in = false;
    while t
        .pending
        .front()
        .is_some_and(|e| !matches!(e, Expect::Sync))
    {
        if let Some(e) = t.pending.pop_front() {
            let mut undo = std::mem::take(&mut t.undo);
            unanswered(e, events, &mut undo);
            t.undo = undo;
        }
    }
}

/// A server message outside result rows with values masked: error and
/// notice texts, notification payloads, parameter values, COPY data and
/// function results. `None`: relayed as it is.
fn mask_other(t: &Track, f: &[u8]) -> Option<Vec<u8>> {
    let head = match t.pending.front() {
        Some(Expect::Query(recs)) => recs.front().and_then(|r| r.mask.clone()),
        Some(Expect::Execute(Some(r))) => r.mask.clone(),
        _ => None,
    };
    let spec = head.or_else(|| t.session_mask.clone())?;
    let body = f.get(5..)?;
    let frame = |kind: u8, body: &[u8]| {
        let mut b = Vec::with_capacity(body.len() + 5);
        b.push(kind);
        b.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        b.extend_from_slice(body);
        b
    };
    let text = |v: &[u8]| -> Option<Vec<u8>> {
        if v.len() > MAX_MASKED_VALUE {
            return Some(vec![b'*'; 4]);
        }
        let s = std::str::from_utf8(v).ok()?;
        spec.mask_text(s).map(String::into_bytes)
    };
    match f[0] {
        b'E' | b'N' => {
            let mut out = Vec::with_capacity(body.len());
            let mut changed = false;
            let mut rest = body;
            while let Some((&field, tail)) = rest.split_first() {
                if field == 0 {
                    break;
                }
                let end = tail.iter().position(|&c| c == 0)?;
                let value = &tail[..end];
                out.push(field);
                // Severity, code, positions and source locations are not data.
                match (b"SVCPpFLR".contains(&field), text(value)) {
                    (false, Some(m)) => {
                        changed = true;
                        out.extend_from_slice(&m);
                    }
                    _ => out.extend_from_slice(value),
                }
                out.push(0);
                rest = &tail[end + 1..];
            }
            out.push(0);
            changed.then(|| frame(f[0], &out))
        }
        b'A' => {
            let (pid, rest) = body.split_at_checked(4)?;
            let end = rest.iter().position(|&c| c == 0)?;
            let (channel, payload) = (&rest[..=end], &rest[end + 1..]);
            let payload = payload.strip_suffix(&[0])?;
            let m = text(payload)?;
            let mut out = pid.to_vec();
            out.extend_from_slice(channel);
            out.extend_from_slice(&m);
            out.push(0);
            Some(frame(b'A', &out))
        }
        b'S' => {
            let end = body.iter().position(|&c| c == 0)?;
            let (name, value) = (&body[..=end], &body[end + 1..]);
            let m = text(value.strip_suffix(&[0])?)?;
            let mut out = name.to_vec();
            out.extend_from_slice(&m);
            out.push(0);
            Some(frame(b'S', &out))
        }
        b'd' => {
            // A COPY row has no column names: a spec that hides columns
            // hides the whole row (its tabs and newlines kept).
            let masked = if spec.hides_names() || std::str::from_utf8(body).is_err() {
                body.iter()
                    .map(|&c| if c == b'\t' || c == b'\n' { c } else { b'*' })
                    .collect()
            } else {
                text(body)?
            };
            Some(frame(b'd', &masked))
        }
        b'V' => {
            let (len, value) = body.split_at_checked(4)?;
            if i32::from_be_bytes(len.try_into().ok()?) < 0 {
                return None;
            }
            let m = text(value)?;
            let mut out = (m.len() as i32).to_be_bytes().to_vec();
            out.extend_from_slice(&m);
            Some(frame(b'V', &out))
        }
        _ => None,
    }
}

/// Pops the head when it is what this message answers.
fn pop_if(t: &mut Track, is: impl Fn(&Expect) -> bool) {
    if t.pending.front().is_some_and(is) {
        t.pending.pop_front();
    }
}

/// For `crate::fuzzing`: the server's bytes `data` through the server's
/// half against a queue built from `expects` (one byte per entry). Returns
/// the bytes for the loop, how many complete frames `data` held (their
/// length), and how many records were closed.
pub(super) fn replay_server(expects: &[u8], data: &[u8]) -> (Vec<u8>, usize, usize) {
    // Entries with bit 0x40 mask their rows (names and every value pattern).
    let spec = Arc::new(
        MaskSpec::parse(&[
            "secret*".to_owned(),
            "value:email".to_owned(),
            "value:card".to_owned(),
            "value:iban".to_owned(),
        ])
        .unwrap_or_else(|_| MaskSpec::hide_all()),
    );
    let masked = |b: &u8| b & 0x40 != 0;
    let rec = |b: &u8| {
        let mut r = Rec::new(Event::note(EventKind::Op(OpKind::Sql), "x", ""));
        if masked(b) {
            r.mask = Some(spec.clone());
        }
        r
    };
    let mut t = Track {
        session_mask: expects.iter().any(masked).then(|| spec.clone()),
        ..Track::default()
    };
    for b in expects {
        t.pending.push_back(match b % 11 {
            0 => Expect::Parse(None),
            1 => Expect::Bind,
            2 => Expect::Describe(None),
            3 => Expect::Close,
            4 => Expect::Execute(Some(rec(b))),
            5 => Expect::Sync,
            6 => Expect::Query(VecDeque::from([rec(b), rec(b)])),
            7 => Expect::Function(rec(b)),
            8 => Expect::Lookup {
                name: None,
                reply: None,
            },
            9 => Expect::Refusal(messages::error("42501", "refused")),
            _ => Expect::Local {
                msg: messages::error("42501", "refused"),
                ready: b & 0x80 != 0,
            },
        });
    }
    let mut buf = BytesMut::from(data);
    let (mut out, mut events, mut framed) = (Vec::new(), Vec::new(), 0);
    drain(&mut t, &mut out);
    while let Ok(Some(f)) = next_frame(&mut buf, MAX_SERVER_MESSAGE) {
        on_server(&mut t, &f, &mut out, &mut events);
        // Rows nobody asked for end the session (not relayed).
        if t.lost {
            break;
        }
        framed += f.len();
        drain(&mut t, &mut out);
    }
    (out, framed, events.len())
}
