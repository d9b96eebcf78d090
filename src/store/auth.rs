//! Users, roles and their key permissions, as etcd's auth store keeps them, and the
//! tokens that name a user to a member.
//!
//! Every change (a user added, a permission granted, authentication switched on) is a
//! Raft entry, applied on every member in log order, and kept in the `auth` column
//! family:
//!
//! | key | value |
//! | --- | --- |
//! | `enabled` | one byte, 1 when authentication is on |
//! | `revision` | the auth revision (u64 BE), one more at every change |
//! | `user/<name>` | `authpb::User` (the password as its bcrypt hash) |
//! | `role/<name>` | `authpb::Role` |
//!
//! Tokens are etcd's simple tokens: handed out by a Raft entry, so that every member
//! knows them, held in memory only, and forgotten after a time without use. A member
//! that restarts forgets them; clients authenticate again, as they do with etcd.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use rocksdb::{ColumnFamily, WriteBatch};

use crate::pb::authpb::{permission, Permission, Role, User, UserAddOptions};
use crate::pb::etcdserverpb::{request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest};
use crate::pb::meshkvpb::auth_request::Request as Change;
use crate::pb::meshkvpb::TokenGrant;

/// The role that may do anything, and the user that must hold it before authentication
/// can be switched on.
pub const ROOT: &str = "root";

pub(crate) const KEY_ENABLED: &[u8] = b"enabled";
pub(crate) const KEY_REVISION: &[u8] = b"revision";
pub(crate) const USER_PREFIX: &[u8] = b"user/";
pub(crate) const ROLE_PREFIX: &[u8] = b"role/";

/// How long a token lives without use, unless the member is told otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// Why an auth change or a permission check failed, in etcd's words (the API adds
/// "etcdserver: " and etcd's gRPC code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name already exists")]
    UserExists,
    #[error("user name not found")]
    UserNotFound,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("role name already exists")]
    RoleExists,
    #[error("role name not found")]
    RoleNotFound,
    #[error("authentication failed, invalid user ID or password")]
    Failed,
    #[error("permission denied")]
    PermissionDenied,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    #[error("authentication is not enabled")]
    NotEnabled,
    #[error("invalid auth token")]
    InvalidToken,
    #[error("revision of auth store is old")]
    OldRevision,
    #[error("invalid auth management")]
    InvalidManagement,
    #[error("root user does not exist")]
    RootUserMissing,
    #[error("root user does not have root role")]
    RootRoleMissing,
}

/// Keys from `start` up to `end` (excluded); no end: every key from `start` on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Span {
    /// The keys a request or a permission names, as etcd reads `key` and `range_end`:
    /// no end is the key alone, `\0` is every key from `key` on.
    fn of(key: &[u8], range_end: &[u8]) -> Span {
        let end = match range_end {
            [] => Some([key, &[0]].concat()),
            [0] => None,
            end => Some(end.to_vec()),
        };
        Span { start: key.to_vec(), end }
    }

    fn is_empty(&self) -> bool {
        self.end.as_ref().is_some_and(|e| *e <= self.start)
    }
}

/// A set of keys as sorted, disjoint spans.
#[derive(Debug, Clone, Default, PartialEq)]
struct KeySet {
    spans: Vec<Span>,
}

impl KeySet {
    fn from_spans(mut spans: Vec<Span>) -> KeySet {
        spans.retain(|s| !s.is_empty());
        spans.sort_by(|a, b| a.start.cmp(&b.start));
        let mut out: Vec<Span> = Vec::with_capacity(spans.len());
        for s in spans {
            match out.last_mut() {
                // Overlapping or touching: one span.
                Some(last) if last.end.as_ref().is_none_or(|e| s.start <= *e) => {
                    last.end = match (&last.end, s.end) {
                        (None, _) | (_, None) => None,
                        (Some(a), Some(b)) => Some(if *a >= b { a.clone() } else { b }),
                    };
                }
                _ => out.push(s),
            }
        }
        KeySet { spans: out }
    }

    /// Whether every key of `want` is in the set.
    fn covers(&self, want: &Span) -> bool {
        if want.is_empty() {
            // An empty range reads nothing; etcd still asks for its first key.
            return self.covers(&Span::of(&want.start, &[]));
        }
        let i = self.spans.partition_point(|s| s.start <= want.start);
        let Some(s) = i.checked_sub(1).map(|i| &self.spans[i]) else { return false };
        match (&s.end, &want.end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(have), Some(want_end)) => want_end <= have,
        }
    }
}

/// What one user may read and write: the union of its roles' permissions.
#[derive(Debug, Clone, Default, PartialEq)]
struct Perms {
    root: bool,
    read: KeySet,
    write: KeySet,
}

/// Read or write, as a check asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Users, roles, the switch and the revision, as applied so far.
#[derive(Debug, Default)]
pub struct AuthState {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    /// Each user's permissions, worked out again after every change.
    perms: HashMap<String, Perms>,
}

fn name_of(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn user_key(name: &str) -> Vec<u8> {
    [USER_PREFIX, name.as_bytes()].concat()
}

fn role_key(name: &str) -> Vec<u8> {
    [ROLE_PREFIX, name.as_bytes()].concat()
}

/// The stored record of whether authentication is on: (key, value) in the `auth` family.
pub(crate) fn enabled_record(on: bool) -> (Vec<u8>, Vec<u8>) {
    (KEY_ENABLED.to_vec(), vec![u8::from(on)])
}

/// The stored record of the auth revision.
pub(crate) fn revision_record(revision: u64) -> (Vec<u8>, Vec<u8>) {
    (KEY_REVISION.to_vec(), revision.to_be_bytes().to_vec())
}

/// The stored record of a user.
pub(crate) fn user_record(u: &User) -> (Vec<u8>, Vec<u8>) {
    (user_key(&name_of(&u.name)), u.encode_to_vec())
}

/// The stored record of a role.
pub(crate) fn role_record(r: &Role) -> (Vec<u8>, Vec<u8>) {
    (role_key(&name_of(&r.name)), r.encode_to_vec())
}

impl AuthState {
    /// The state as the `auth` column family keeps it: `(key, value)` in any order.
    pub fn load<K: AsRef<[u8]>, V: AsRef<[u8]>>(records: impl IntoIterator<Item = (K, V)>) -> Result<Self, String> {
        let mut s = AuthState::default();
        for (k, v) in records {
            let (k, v) = (k.as_ref(), v.as_ref());
            if k == KEY_ENABLED {
                s.enabled = v.first() == Some(&1);
            } else if k == KEY_REVISION {
                s.revision = u64::from_be_bytes(v.try_into().map_err(|_| "bad auth revision".to_string())?);
            } else if let Some(name) = k.strip_prefix(USER_PREFIX) {
                let u = User::decode(v).map_err(|e| format!("user {name:?}: {e}"))?;
                s.users.insert(name_of(&u.name), u);
            } else if let Some(name) = k.strip_prefix(ROLE_PREFIX) {
                let r = Role::decode(v).map_err(|e| format!("role {name:?}: {e}"))?;
                s.roles.insert(name_of(&r.name), r);
            } else {
                return Err(format!("unknown auth key {k:?}"));
            }
        }
        s.refresh();
        Ok(s)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// User names, sorted.
    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// Role names, sorted.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// Whether `user` holds the root role.
    pub fn is_admin(&self, user: &str) -> bool {
        self.perms.get(user).is_some_and(|p| p.root)
    }

    fn refresh(&mut self) {
        self.perms = self.users.iter().map(|(name, u)| (name.clone(), self.perms_of(u))).collect();
    }

    fn perms_of(&self, u: &User) -> Perms {
        let (mut read, mut write) = (Vec::new(), Vec::new());
        let mut root = false;
        for role in &u.roles {
            root |= role == ROOT;
            for p in self.roles.get(role).map(|r| r.key_permission.as_slice()).unwrap_or_default() {
                // etcd reads an empty key as past every key (its clients send "\0" for
                // "from the first key"): such a permission holds no key.
                if p.key.is_empty() {
                    continue;
                }
                let span = Span::of(&p.key, &p.range_end);
                match permission::Type::try_from(p.perm_type) {
                    Ok(permission::Type::Read) => read.push(span),
                    Ok(permission::Type::Write) => write.push(span),
                    Ok(permission::Type::Readwrite) => {
                        read.push(span.clone());
                        write.push(span);
                    }
                    Err(_) => {}
                }
            }
        }
        Perms { root, read: KeySet::from_spans(read), write: KeySet::from_spans(write) }
    }

    /// Whether `user` may read or write the keys `key`..`range_end` (etcd's reading of
    /// the pair). Always when authentication is off.
    pub fn check(&self, user: &str, access: Access, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        let Some(p) = self.perms.get(user) else { return Err(AuthError::PermissionDenied) };
        if p.root {
            return Ok(());
        }
        let set = match access {
            Access::Read => &p.read,
            Access::Write => &p.write,
        };
        // An empty key asked for is, as in a permission, past every key: as no permission
        // holds it, no user but root is let through with it.
        if set.covers(&Span::of(key, range_end)) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// Requires `user` to hold the root role when authentication is on.
    pub fn check_admin(&self, user: &str) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if user.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.is_admin(user) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    pub fn check_range(&self, user: &str, r: &RangeRequest) -> Result<(), AuthError> {
        self.check(user, Access::Read, &r.key, &r.range_end)
    }

    pub fn check_put(&self, user: &str, p: &PutRequest) -> Result<(), AuthError> {
        self.check(user, Access::Write, &p.key, &[])?;
        if p.prev_kv {
            self.check(user, Access::Read, &p.key, &[])?;
        }
        Ok(())
    }

    pub fn check_delete(&self, user: &str, d: &DeleteRangeRequest) -> Result<(), AuthError> {
        self.check(user, Access::Write, &d.key, &d.range_end)?;
        if d.prev_kv {
            self.check(user, Access::Read, &d.key, &d.range_end)?;
        }
        Ok(())
    }

    /// A Txn needs every compare's keys readable and every operation of both branches
    /// allowed, whichever branch runs, as etcd checks it.
    pub fn check_txn(&self, user: &str, t: &TxnRequest) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        for c in &t.compare {
            self.check(user, Access::Read, &c.key, &c.range_end)?;
        }
        t.success.iter().chain(&t.failure).try_for_each(|op| self.check_op(user, op))
    }

    fn check_op(&self, user: &str, op: &RequestOp) -> Result<(), AuthError> {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => self.check_range(user, r),
            Some(request_op::Request::RequestPut(p)) => self.check_put(user, p),
            Some(request_op::Request::RequestDeleteRange(d)) => self.check_delete(user, d),
            Some(request_op::Request::RequestTxn(t)) => self.check_txn(user, t),
            None => Ok(()),
        }
    }

    /// Applies one change, writing what it changes into `batch` (column family `cf`).
    /// `by` is the user who asked, checked for the root role when authentication is on.
    /// Returns the token granted, for a [`Change::Token`].
    pub fn apply(
        &mut self,
        change: &Change,
        by: Option<&str>,
        batch: &mut WriteBatch,
        cf: &ColumnFamily,
        tokens: &Tokens,
    ) -> Result<(), AuthError> {
        match change {
            Change::Token(t) => {
                if !self.enabled {
                    return Err(AuthError::NotEnabled);
                }
                if !self.users.contains_key(&t.user) {
                    return Err(AuthError::Failed);
                }
                let age = Duration::from_millis(unix_ms().saturating_sub(t.granted_unix_ms).max(0) as u64);
                tokens.grant_aged(&t.token, &t.user, age);
                return Ok(());
            }
            Change::Enable(_) => return self.enable(batch, cf, tokens),
            _ => {}
        }
        if let Some(by) = by {
            self.check_admin(by)?;
        }
        match change {
            Change::Token(_) | Change::Enable(_) => unreachable!("handled above"),
            Change::Disable(_) => {
                if !self.enabled {
                    return Ok(());
                }
                self.enabled = false;
                let (k, v) = enabled_record(false);
                batch.put_cf(cf, k, v);
                tokens.clear();
                tracing::info!("authentication disabled");
            }
            Change::UserAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if self.users.contains_key(&r.name) {
                    return Err(AuthError::UserExists);
                }
                let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
                let u = User {
                    name: Bytes::from(r.name.clone().into_bytes()),
                    password: if no_password { Bytes::new() } else { Bytes::from(r.hashed_password.clone()) },
                    roles: Vec::new(),
                    options: Some(UserAddOptions { no_password }),
                };
                self.put_user(u, batch, cf);
            }
            Change::UserDelete(r) => {
                if self.enabled && r.name == ROOT {
                    return Err(AuthError::InvalidManagement);
                }
                if self.users.remove(&r.name).is_none() {
                    return Err(AuthError::UserNotFound);
                }
                batch.delete_cf(cf, user_key(&r.name));
                tokens.forget_user(&r.name);
            }
            Change::UserChangePassword(r) => {
                let mut u = self.users.get(&r.name).cloned().ok_or(AuthError::UserNotFound)?;
                u.password = Bytes::from(r.hashed_password.clone());
                self.put_user(u, batch, cf);
                tokens.forget_user(&r.name);
            }
            Change::UserGrantRole(r) => {
                let mut u = self.users.get(&r.user).cloned().ok_or(AuthError::UserNotFound)?;
                if r.role != ROOT && !self.roles.contains_key(&r.role) {
                    return Err(AuthError::RoleNotFound);
                }
                match u.roles.binary_search(&r.role) {
                    // etcd answers as if granted.
                    Ok(_) => return Ok(()),
                    Err(i) => u.roles.insert(i, r.role.clone()),
                }
                self.put_user(u, batch, cf);
            }
            Change::UserRevokeRole(r) => {
                if self.enabled && r.name == ROOT && r.role == ROOT {
                    return Err(AuthError::InvalidManagement);
                }
                let mut u = self.users.get(&r.name).cloned().ok_or(AuthError::UserNotFound)?;
                let i = u.roles.iter().position(|x| *x == r.role).ok_or(AuthError::RoleNotGranted)?;
                u.roles.remove(i);
                self.put_user(u, batch, cf);
            }
            Change::RoleAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if self.roles.contains_key(&r.name) {
                    return Err(AuthError::RoleExists);
                }
                self.put_role(
                    Role { name: Bytes::from(r.name.clone().into_bytes()), key_permission: vec![] },
                    batch,
                    cf,
                );
            }
            Change::RoleDelete(r) => {
                if self.enabled && r.role == ROOT {
                    return Err(AuthError::InvalidManagement);
                }
                if self.roles.remove(&r.role).is_none() {
                    return Err(AuthError::RoleNotFound);
                }
                batch.delete_cf(cf, role_key(&r.role));
                let holders: Vec<User> = self.users.values().filter(|u| u.roles.contains(&r.role)).cloned().collect();
                for mut u in holders {
                    u.roles.retain(|x| *x != r.role);
                    self.put_user(u, batch, cf);
                }
            }
            Change::RoleGrantPermission(r) => {
                let mut role = self.roles.get(&r.name).cloned().ok_or(AuthError::RoleNotFound)?;
                let Some(p) = r.perm.clone() else { return Err(AuthError::PermissionNotGranted) };
                let same = |q: &Permission| q.key == p.key && q.range_end == p.range_end;
                match role.key_permission.iter_mut().find(|q| same(q)) {
                    Some(q) => q.perm_type = p.perm_type,
                    None => {
                        let i = role.key_permission.partition_point(|q| q.key <= p.key);
                        role.key_permission.insert(i, p);
                    }
                }
                self.put_role(role, batch, cf);
            }
            Change::RoleRevokePermission(r) => {
                let mut role = self.roles.get(&r.role).cloned().ok_or(AuthError::RoleNotFound)?;
                let i = role
                    .key_permission
                    .iter()
                    .position(|q| q.key == r.key && q.range_end == r.range_end)
                    .ok_or(AuthError::PermissionNotGranted)?;
                role.key_permission.remove(i);
                self.put_role(role, batch, cf);
            }
        }
        self.bump(batch, cf);
        Ok(())
    }

    fn enable(&mut self, batch: &mut WriteBatch, cf: &ColumnFamily, tokens: &Tokens) -> Result<(), AuthError> {
        if self.enabled {
            return Ok(());
        }
        let root = self.users.get(ROOT).ok_or(AuthError::RootUserMissing)?;
        if !root.roles.iter().any(|r| r == ROOT) {
            return Err(AuthError::RootRoleMissing);
        }
        self.enabled = true;
        let (k, v) = enabled_record(true);
        batch.put_cf(cf, k, v);
        tokens.clear();
        self.bump(batch, cf);
        tracing::info!("authentication enabled");
        Ok(())
    }

    fn bump(&mut self, batch: &mut WriteBatch, cf: &ColumnFamily) {
        self.revision += 1;
        let (k, v) = revision_record(self.revision);
        batch.put_cf(cf, k, v);
        self.refresh();
    }

    fn put_user(&mut self, u: User, batch: &mut WriteBatch, cf: &ColumnFamily) {
        let (k, v) = user_record(&u);
        batch.put_cf(cf, k, v);
        self.users.insert(name_of(&u.name), u);
    }

    fn put_role(&mut self, r: Role, batch: &mut WriteBatch, cf: &ColumnFamily) {
        let (k, v) = role_record(&r);
        batch.put_cf(cf, k, v);
        self.roles.insert(name_of(&r.name), r);
    }
}

/// A token's user and when it was last used.
struct TokenEntry {
    user: String,
    /// Milliseconds since the table's start when the token was last used.
    used: AtomicU64,
}

/// The tokens this member knows: etcd's simple tokens. A token unused for its time to
/// live is forgotten.
pub struct Tokens {
    ttl: Duration,
    start: Instant,
    live: RwLock<HashMap<String, TokenEntry>>,
    /// Set when tokens are JWTs (`--auth-token jwt,…`): then no simple token is issued.
    jwt: Option<super::jwt::Jwt>,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens::new(DEFAULT_TOKEN_TTL)
    }
}

/// A grant of `token` to `user`, stamped with when it is made: applied again after a
/// crash, it does not bring back a token idle past its time.
pub fn token_grant(user: String, token: String) -> TokenGrant {
    TokenGrant { user, token, granted_unix_ms: unix_ms() }
}

/// Milliseconds since the Unix epoch by this member's clock.
fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Tokens {
    pub fn new(ttl: Duration) -> Self {
        Tokens { ttl, start: Instant::now(), live: RwLock::new(HashMap::new()), jwt: None }
    }

    /// Issues and checks JWTs with `jwt` instead of simple tokens.
    pub fn with_jwt(mut self, jwt: Option<super::jwt::Jwt>) -> Self {
        self.jwt = jwt;
        self
    }

    pub fn jwt(&self) -> Option<&super::jwt::Jwt> {
        self.jwt.as_ref()
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn expired(&self, e: &TokenEntry, now: u64) -> bool {
        now.saturating_sub(e.used.load(Ordering::Relaxed)) > self.ttl.as_millis() as u64
    }

    /// The user a token names, if it is known and not expired; its time to live starts
    /// again.
    pub fn user(&self, token: &str) -> Option<String> {
        self.user_at(token, self.now_ms())
    }

    fn user_at(&self, token: &str, now: u64) -> Option<String> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let e = live.get(token)?;
        if self.expired(e, now) {
            return None;
        }
        e.used.store(now, Ordering::Relaxed);
        Some(e.user.clone())
    }

    /// Knows `token` as `user`'s, as if last used `age` ago: not at all if that is past
    /// its time to live.
    fn grant_aged(&self, token: &str, user: &str, age: Duration) {
        if age > self.ttl {
            return;
        }
        let now = self.now_ms();
        self.grant_at(token, user, now.saturating_sub(age.as_millis() as u64));
    }

    fn grant_at(&self, token: &str, user: &str, now: u64) {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, e| !self.expired(e, now));
        live.insert(token.to_string(), TokenEntry { user: user.to_string(), used: AtomicU64::new(now) });
    }

    fn forget_user(&self, user: &str) {
        self.live.write().unwrap_or_else(|e| e.into_inner()).retain(|_, e| e.user != user);
    }

    fn clear(&self) {
        self.live.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.live.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(spans: &[(&[u8], &[u8])]) -> KeySet {
        KeySet::from_spans(spans.iter().map(|(k, e)| Span::of(k, e)).collect())
    }

    fn has(s: &KeySet, key: &[u8], end: &[u8]) -> bool {
        s.covers(&Span::of(key, end))
    }

    #[test]
    fn spans_merge_and_cover_as_etcd_reads_them() {
        let s = set(&[(b"/a", b"/b"), (b"/p/", b"/p0"), (b"z", b"\0"), (b"k1", b"")]);
        assert!(has(&s, b"/a", b""));
        assert!(has(&s, b"/a", b"/b"));
        assert!(!has(&s, b"/a", b"/c"));
        assert!(has(&s, b"/p/x", b""));
        assert!(has(&s, b"/p/", b"/p0"));
        assert!(!has(&s, b"/p", b""));
        assert!(has(&s, b"k1", b""));
        assert!(!has(&s, b"k1", b"k2"));
        assert!(!has(&s, b"k10", b""));
        assert!(has(&s, b"zz", b"\0"));
        assert!(has(&s, b"z", b""));
        assert!(!has(&s, b"\0", b"\0"));
        assert!(!has(&s, b"y", b"\0"));
        // Spans that touch or overlap serve a range across both.
        let s = set(&[(b"a", b"c"), (b"c", b"e"), (b"b", b"d")]);
        assert_eq!(s.spans.len(), 1);
        assert!(has(&s, b"a", b"e"));
        assert!(!has(&s, b"a", b"e\0"));
        let s = set(&[(b"a", b"c"), (b"d", b"e")]);
        assert!(!has(&s, b"a", b"e"));
        assert!(has(&s, b"d", b"e"));
        // Everything.
        let s = set(&[(b"", b"\0")]);
        assert!(has(&s, b"\0", b"\0"));
        assert!(has(&s, b"", b""));
        assert!(!has(&set(&[]), b"a", b""));
    }

    /// A database for the changes' column family.
    struct Db {
        _dir: tempfile::TempDir,
        engine: crate::store::Engine,
    }

    fn db() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::store::Engine::open(dir.path()).unwrap();
        Db { _dir: dir, engine }
    }

    fn apply(d: &Db, s: &mut AuthState, c: Change, by: Option<&str>, t: &Tokens) -> Result<(), AuthError> {
        let engine = &d.engine;
        let cf = engine.cf(crate::store::engine::CF_AUTH);
        let mut batch = WriteBatch::default();
        let r = s.apply(&c, by, &mut batch, cf, t);
        engine.write(batch, false).unwrap();
        let again = AuthState::load(
            engine.db().iterator_cf(cf, rocksdb::IteratorMode::Start).map(|i| i.unwrap()).collect::<Vec<_>>(),
        )
        .unwrap();
        // What was written is what is held.
        assert_eq!(again.revision, s.revision);
        assert_eq!(again.enabled, s.enabled);
        assert_eq!(again.users, s.users);
        assert_eq!(again.roles, s.roles);
        assert_eq!(again.perms, s.perms);
        r
    }

    use crate::pb::etcdserverpb::*;

    #[test]
    fn root_must_exist_with_its_role_before_auth_is_on() {
        let (d, t) = (db(), Tokens::default());
        let mut s = AuthState::default();
        let e = Change::Enable(AuthEnableRequest {});
        assert_eq!(apply(&d, &mut s, e.clone(), None, &t), Err(AuthError::RootUserMissing));
        let add = |n: &str| {
            Change::UserAdd(AuthUserAddRequest { name: n.into(), hashed_password: "h".into(), ..Default::default() })
        };
        apply(&d, &mut s, add(ROOT), None, &t).unwrap();
        assert_eq!(apply(&d, &mut s, add(ROOT), None, &t), Err(AuthError::UserExists));
        assert_eq!(apply(&d, &mut s, add(""), None, &t), Err(AuthError::UserEmpty));
        assert_eq!(apply(&d, &mut s, e.clone(), None, &t), Err(AuthError::RootRoleMissing));
        let grant = Change::UserGrantRole(AuthUserGrantRoleRequest { user: ROOT.into(), role: ROOT.into() });
        apply(&d, &mut s, grant, None, &t).unwrap();
        apply(&d, &mut s, e, None, &t).unwrap();
        assert!(s.enabled());
        assert!(s.check(ROOT, Access::Write, b"\0", b"\0").is_ok());
        assert_eq!(s.check("", Access::Read, b"a", b""), Err(AuthError::UserEmpty));
        assert_eq!(s.check("nobody", Access::Read, b"a", b""), Err(AuthError::PermissionDenied));
        // Root stays while auth is on.
        let del = Change::UserDelete(AuthUserDeleteRequest { name: ROOT.into() });
        assert_eq!(apply(&d, &mut s, del, Some(ROOT), &t), Err(AuthError::InvalidManagement));
        // Only root manages.
        apply(&d, &mut s, add("alice"), Some(ROOT), &t).unwrap();
        assert_eq!(apply(&d, &mut s, add("bob"), Some("alice"), &t), Err(AuthError::PermissionDenied));
        assert_eq!(s.user_names(), vec!["alice".to_string(), ROOT.to_string()]);
    }

    #[test]
    fn roles_give_their_users_permissions_and_take_them_back() {
        let (d, t) = (db(), Tokens::default());
        let mut s = AuthState::default();
        for c in [
            Change::UserAdd(AuthUserAddRequest { name: ROOT.into(), ..Default::default() }),
            Change::UserGrantRole(AuthUserGrantRoleRequest { user: ROOT.into(), role: ROOT.into() }),
            Change::UserAdd(AuthUserAddRequest { name: "alice".into(), ..Default::default() }),
            Change::RoleAdd(AuthRoleAddRequest { name: "reader".into() }),
            Change::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                name: "reader".into(),
                perm: Some(Permission { perm_type: 0, key: "/p/".into(), range_end: "/p0".into() }),
            }),
            Change::UserGrantRole(AuthUserGrantRoleRequest { user: "alice".into(), role: "reader".into() }),
            Change::Enable(AuthEnableRequest {}),
        ] {
            apply(&d, &mut s, c, None, &t).unwrap();
        }
        assert!(s.check("alice", Access::Read, b"/p/x", b"").is_ok());
        assert_eq!(s.check("alice", Access::Write, b"/p/x", b""), Err(AuthError::PermissionDenied));
        let put = PutRequest { key: "/p/x".into(), ..Default::default() };
        assert_eq!(s.check_put("alice", &put), Err(AuthError::PermissionDenied));
        // Granting the same key and end again changes its type.
        let rw = Change::RoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: "reader".into(),
            perm: Some(Permission { perm_type: 2, key: "/p/".into(), range_end: "/p0".into() }),
        });
        apply(&d, &mut s, rw, Some(ROOT), &t).unwrap();
        assert_eq!(s.role("reader").unwrap().key_permission.len(), 1);
        assert!(s.check_put("alice", &put).is_ok());
        // A Txn is checked on both branches.
        let txn = TxnRequest {
            compare: vec![],
            success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put.clone())) }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: "/q".into(),
                    ..Default::default()
                })),
            }],
        };
        assert_eq!(s.check_txn("alice", &txn), Err(AuthError::PermissionDenied));
        // Deleting the role takes it from its users.
        let del = Change::RoleDelete(AuthRoleDeleteRequest { role: "reader".into() });
        apply(&d, &mut s, del, Some(ROOT), &t).unwrap();
        assert!(s.user("alice").unwrap().roles.is_empty());
        assert_eq!(s.check("alice", Access::Read, b"/p/x", b""), Err(AuthError::PermissionDenied));
        let revoke = Change::UserRevokeRole(AuthUserRevokeRoleRequest { name: "alice".into(), role: "reader".into() });
        assert_eq!(apply(&d, &mut s, revoke, Some(ROOT), &t), Err(AuthError::RoleNotGranted));
    }

    #[test]
    fn an_empty_key_is_past_every_key_in_a_permission_and_in_a_check() {
        let (d, t) = (db(), Tokens::default());
        let mut s = AuthState::default();
        let grant = |key: &str, range_end: &str| {
            Change::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                name: "r".into(),
                perm: Some(Permission {
                    perm_type: 2,
                    key: key.to_string().into(),
                    range_end: range_end.to_string().into(),
                }),
            })
        };
        for c in [
            Change::UserAdd(AuthUserAddRequest { name: ROOT.into(), ..Default::default() }),
            Change::UserGrantRole(AuthUserGrantRoleRequest { user: ROOT.into(), role: ROOT.into() }),
            Change::UserAdd(AuthUserAddRequest { name: "alice".into(), ..Default::default() }),
            Change::RoleAdd(AuthRoleAddRequest { name: "r".into() }),
            grant("", "m"),
            Change::UserGrantRole(AuthUserGrantRoleRequest { user: "alice".into(), role: "r".into() }),
            Change::Enable(AuthEnableRequest {}),
        ] {
            apply(&d, &mut s, c, None, &t).unwrap();
        }
        // From "" to "m" holds nothing; from "\0" to "m" holds "a".
        assert_eq!(s.check("alice", Access::Read, b"a", b""), Err(AuthError::PermissionDenied));
        apply(&d, &mut s, grant("\0", "m"), Some(ROOT), &t).unwrap();
        assert!(s.check("alice", Access::Read, b"a", b"").is_ok());
        // Asked with an empty key, only root is let through.
        assert_eq!(s.check("alice", Access::Read, b"", b"b"), Err(AuthError::PermissionDenied));
        assert!(s.check(ROOT, Access::Read, b"", b"b").is_ok());
    }

    #[test]
    fn tokens_name_their_user_until_forgotten() {
        let t = Tokens::new(Duration::from_secs(300));
        t.grant_at("tok", "alice", 1_000);
        // Each use starts its time to live again.
        assert_eq!(t.user_at("tok", 200_000).as_deref(), Some("alice"));
        assert_eq!(t.user_at("tok", 450_000).as_deref(), Some("alice"));
        assert_eq!(t.user_at("other", 450_000), None);
        assert_eq!(t.user_at("tok", 750_001), None);
        // Expired tokens go when the next one is granted.
        t.grant_at("tok2", "bob", 750_002);
        assert_eq!(t.len(), 1);
        t.forget_user("bob");
        assert_eq!(t.user("tok2"), None);
        assert!(t.is_empty());
        // A grant applied again long after it was made (a replay after a crash) is
        // ignored; a recent one lives out the rest of its time.
        let t = Tokens::new(Duration::from_secs(300));
        t.grant_aged("old", "carol", Duration::from_secs(301));
        assert_eq!(t.user("old"), None);
        t.grant_aged("recent", "carol", Duration::from_secs(10));
        assert_eq!(t.user("recent").as_deref(), Some("carol"));
    }
}
