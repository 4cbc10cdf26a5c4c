//! The Lua scripts, compiled in with `include_str!` and run with `EVALSHA` (loaded on a
//! `NOSCRIPT` answer, e.g. after a server restart).

use std::sync::LazyLock;

use redis::aio::ConnectionManager;
use redis::{Cmd, FromRedisValue, RedisResult, Script};

/// A script built from library chunks (`common.lua` first for broker scripts) and its body.
macro_rules! script {
    ($name:ident, $($file:literal),+) => {
        pub(crate) static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(concat!($(include_str!($file)),+)));
    };
}

script!(CONSUME, "scripts/common.lua", "scripts/consume.lua");
script!(ACK, "scripts/common.lua", "scripts/ack_lib.lua", "scripts/ack.lua");
script!(FINISH, "scripts/common.lua", "scripts/status_lib.lua", "scripts/ack_lib.lua", "scripts/finish.lua");
script!(NACK, "scripts/common.lua", "scripts/nack.lua");
script!(RETRY, "scripts/common.lua", "scripts/retry.lua");
script!(EXTEND, "scripts/common.lua", "scripts/extend.lua");
script!(DEAD, "scripts/common.lua", "scripts/dead.lua");
script!(REPLAY, "scripts/common.lua", "scripts/replay.lua");
script!(PURGE, "scripts/common.lua", "scripts/purge.lua");
script!(COUNTS, "scripts/common.lua", "scripts/counts.lua");
script!(BROADCAST, "scripts/common.lua", "scripts/broadcast.lua");

script!(SET_STATUS, "scripts/status_lib.lua", "scripts/set_status.lua");
script!(PROGRESS, "scripts/progress.lua");
script!(GROUP_INIT, "scripts/group_init.lua");
script!(GROUP_RECORD, "scripts/group_record.lua");
script!(GROUP_RECORD_MANY, "scripts/group_record_many.lua");
script!(CHORD_CLAIM, "scripts/chord_claim.lua");
script!(HEARTBEAT, "scripts/heartbeat.lua");
script!(WORKERS, "scripts/workers.lua");

/// An `EVALSHA` call being built: arguments are written straight into the command buffer.
pub(crate) struct Eval {
    script: &'static Script,
    cmd: Cmd,
}

impl Eval {
    /// A call of `script` (no KEYS; the namespace is the first argument by convention).
    pub(crate) fn new(script: &'static LazyLock<Script>) -> Self {
        let script: &'static Script = script;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(0);
        Eval { script, cmd }
    }

    /// Append an argument.
    pub(crate) fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// The `EVALSHA` command, to send in a pipeline (whose caller handles `NOSCRIPT`).
    pub(crate) fn command(&self) -> &Cmd {
        &self.cmd
    }

    /// Run it, loading the script first if the server does not know it.
    pub(crate) async fn run<T: FromRedisValue>(&self, conn: &mut ConnectionManager) -> RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            other => other,
        }
    }
}
