//! The Auth service, and who a request comes from.
//!
//! As etcd: authentication is switched on once a `root` user holding the `root` role
//! exists; from then on a client names its user by a token from `Authenticate`, sent in
//! its calls' `token` metadata (`authorization` through the JSON gateway), or, without a
//! token, by the common name of its TLS client certificate. Reads are checked here
//! against the member's view of the permissions; writes, and changes to users and roles,
//! again when their Raft entry is applied, so a permission revoked before a write
//! commits refuses it on every member alike.

use std::future::Future;

use rand::Rng as _;

use tonic::{Code, Request, Response, Status};

use super::Ctx;
use crate::pb::etcdserverpb::auth_server::Auth;
use crate::pb::etcdserverpb::*;
use crate::pb::meshkvpb::auth_request::Request as Change;
use crate::pb::meshkvpb::internal_request::Request as Write;
use crate::pb::meshkvpb::AuthRequest;
use crate::store::auth::AuthError;
use crate::store::mvcc::WriteResponse;

/// bcrypt's cost for new passwords unless the member is told otherwise, as etcd's.
pub const DEFAULT_BCRYPT_COST: u32 = 10;

/// The user a client request comes from: empty when it names none, and always when
/// authentication is off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller(pub String);

impl Caller {
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::UserEmpty
            | AuthError::RoleEmpty
            | AuthError::Failed
            | AuthError::InvalidManagement
            | AuthError::OldRevision => Code::InvalidArgument,
            AuthError::PermissionDenied => Code::PermissionDenied,
            AuthError::InvalidToken => Code::Unauthenticated,
            AuthError::UserExists
            | AuthError::UserNotFound
            | AuthError::RoleExists
            | AuthError::RoleNotFound
            | AuthError::RoleNotGranted
            | AuthError::PermissionNotGranted
            | AuthError::NotEnabled
            | AuthError::RootUserMissing
            | AuthError::RootRoleMissing => Code::FailedPrecondition,
        };
        Status::new(code, format!("etcdserver: {e}"))
    }
}

/// A maintenance call refused: etcd answers these in its auth package's own words,
/// without a gRPC code of their own.
pub fn maintenance_refused(e: AuthError) -> Status {
    Status::new(Code::Unknown, format!("auth: {e}"))
}

/// What a request names its user by, kept by a stream for the checks it makes later.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    token: Option<String>,
    cert: Option<String>,
}

/// The token a request carries, if any: `token` metadata (clients), or `authorization`
/// (the JSON gateway's header). A token that is not text is no token this member handed
/// out.
fn token_of<T>(request: &Request<T>) -> Option<&str> {
    let md = request.metadata();
    let token = md.get("token").or_else(|| md.get("authorization"))?;
    Some(token.to_str().unwrap_or("\u{0}"))
}

fn cert_of<T>(request: &Request<T>) -> Option<&str> {
    request.extensions().get::<crate::tls::ClientInfo>()?.cert_name.as_deref()
}

impl Credentials {
    pub fn of<T>(request: &Request<T>) -> Self {
        Credentials { token: token_of(request).map(str::to_string), cert: cert_of(request).map(str::to_string) }
    }
}

impl Ctx {
    /// Who `request` comes from. Fails only for a token this member does not know (or
    /// no longer: tokens expire, and a member forgets them when it restarts). The
    /// request's credentials are taken at once: the future holds none of it.
    pub fn caller<T>(&self, request: &Request<T>) -> impl Future<Output = Result<Caller, Status>> + Send + '_ {
        let who = Credentials::of(request);
        async move { self.caller_of(&who).await }
    }

    /// Who `c` names, as [`caller`](Self::caller). A simple token is handed out by a
    /// Raft entry, and a client may bring it here before this member has applied that
    /// entry: as etcd waits for a token's index, a token not known is looked for again
    /// once this member has applied what the leader had committed.
    pub async fn caller_of(&self, c: &Credentials) -> Result<Caller, Status> {
        if !self.store.auth_enabled() {
            return Ok(Caller::default());
        }
        let first = self.named(c.token.as_deref(), c.cert.as_deref());
        let simple = c.token.is_some() && self.store.tokens().jwt().is_none();
        if first.is_err() && simple && self.raft.read_index().await.is_ok() {
            return self.named(c.token.as_deref(), c.cert.as_deref());
        }
        first
    }

    fn named(&self, token: Option<&str>, cert: Option<&str>) -> Result<Caller, Status> {
        match (token, self.store.tokens().jwt()) {
            (Some(token), Some(jwt)) => {
                let (user, revision) = jwt.check(token).ok_or(AuthError::InvalidToken)?;
                // As etcd: a token issued before the users, roles or permissions last
                // changed is refused, and clients sign in again.
                if revision < self.store.auth().revision() {
                    return Err(AuthError::OldRevision.into());
                }
                Ok(Caller(user))
            }
            (Some(token), None) => match self.store.tokens().user(token) {
                Some(user) => Ok(Caller(user)),
                None => Err(AuthError::InvalidToken.into()),
            },
            (None, _) => Ok(Caller(cert.unwrap_or_default().to_string())),
        }
    }

    /// Requires the caller to hold the root role, when authentication is on.
    pub fn require_admin<T>(&self, request: &Request<T>) -> impl Future<Output = Result<Caller, Status>> + Send + '_ {
        let who = Credentials::of(request);
        async move {
            let caller = self.caller_of(&who).await?;
            self.store.auth().check_admin(caller.name())?;
            Ok(caller)
        }
    }

    /// Requires the caller to be allowed to read `key`..`range_end`.
    pub fn require_read(&self, caller: &Caller, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        if self.store.auth_enabled() {
            self.store.auth().check(caller.name(), crate::store::auth::Access::Read, key, range_end)?;
        }
        Ok(())
    }
}

pub struct AuthService {
    ctx: Ctx,
    bcrypt_cost: u32,
}

impl AuthService {
    pub fn new(ctx: Ctx, bcrypt_cost: u32) -> Self {
        Self { ctx, bcrypt_cost }
    }

    /// Proposes an auth change as the caller (checked for the root role on apply too).
    async fn change(&self, caller: &Caller, change: Change) -> Result<Option<ResponseHeader>, Status> {
        match self.ctx.propose(caller, Write::Auth(AuthRequest { request: Some(change) })).await? {
            WriteResponse::Auth => Ok(self.ctx.header(None)),
            _ => Err(Status::internal("etcdserver: unexpected apply result for auth")),
        }
    }

    /// The password's bcrypt hash, made off the async workers (it takes tens of
    /// milliseconds by design).
    async fn hash(&self, password: String) -> Result<String, Status> {
        let cost = self.bcrypt_cost;
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("etcdserver: {e}")))
    }

    /// Waits until this member has applied every auth change committed before the call.
    async fn linearized(&self) -> Result<(), Status> {
        Ok(self.ctx.raft.read_index().await?)
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, request: Request<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        let caller = self.ctx.caller(&request).await?;
        let header = self.change(&caller, Change::Enable(AuthEnableRequest {})).await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let header = self.change(&caller, Change::Disable(AuthDisableRequest {})).await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(&self, _: Request<AuthStatusRequest>) -> Result<Response<AuthStatusResponse>, Status> {
        self.linearized().await?;
        let auth = self.ctx.store.auth();
        let (enabled, auth_revision) = (auth.enabled(), auth.revision());
        drop(auth);
        Ok(Response::new(AuthStatusResponse { header: self.ctx.header(None), enabled, auth_revision }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        // As etcd: a token sent along must be valid too, though it is told only once the
        // password is right.
        let sent_token = self.ctx.caller(&request).await.map(drop);
        let req = request.into_inner();
        if self.ctx.store.tokens().jwt().is_some() {
            // No Raft entry hands a JWT out: the store is brought up to date first, so
            // that the password checked and the revision signed are the latest.
            self.ctx.raft.read_index().await?;
        }
        if !self.ctx.store.auth_enabled() {
            return Err(AuthError::NotEnabled.into());
        }
        // The revision the password is checked at: a token signed with it is refused
        // once users, roles or permissions change, a password among them.
        let (revision, user) = {
            let auth = self.ctx.store.auth();
            (auth.revision(), auth.user(&req.name).cloned())
        };
        let Some(user) = user else { return Err(AuthError::Failed.into()) };
        if user.options.as_ref().is_some_and(|o| o.no_password) {
            return Err(Status::new(
                Code::Unknown,
                "auth: authentication failed, password was given for no password user",
            ));
        }
        let hash = String::from_utf8_lossy(&user.password).into_owned();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(req.password, &hash).unwrap_or(false))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if !ok {
            return Err(AuthError::Failed.into());
        }
        sent_token?;
        if let Some(jwt) = self.ctx.store.tokens().jwt() {
            let token = jwt.sign(&req.name, revision).ok_or_else(|| {
                Status::new(Code::Unavailable, "etcdserver: this member has no priv-key to sign auth tokens with")
            })?;
            return Ok(Response::new(AuthenticateResponse { header: self.ctx.header(None), token }));
        }
        // etcd's simple token: sixteen random letters and a number.
        let letters: String = (0..16).map(|_| rand::rng().sample(rand::distr::Alphabetic) as char).collect();
        let token = format!("{letters}.{}", self.ctx.store.applied_index() + 1);
        let grant = crate::store::auth::token_grant(req.name, token.clone());
        let write = Write::Auth(AuthRequest { request: Some(Change::Token(grant)) });
        match self.ctx.raft.propose(write).await? {
            WriteResponse::Auth => Ok(Response::new(AuthenticateResponse { header: self.ctx.header(None), token })),
            _ => Err(Status::internal("etcdserver: unexpected apply result for authenticate")),
        }
    }

    async fn user_add(&self, request: Request<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let mut req = request.into_inner();
        if req.name.is_empty() {
            return Err(AuthError::UserEmpty.into());
        }
        let no_password = req.options.as_ref().is_some_and(|o| o.no_password);
        if no_password {
            req.hashed_password.clear();
        } else if req.hashed_password.is_empty() {
            req.hashed_password = self.hash(std::mem::take(&mut req.password)).await?;
        }
        req.password.clear();
        let header = self.change(&caller, Change::UserAdd(req)).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(&self, request: Request<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        let caller = self.ctx.caller(&request).await?;
        let req = request.into_inner();
        if caller.name() != req.name {
            self.ctx.store.auth().check_admin(caller.name())?;
        }
        self.linearized().await?;
        let roles = self.ctx.store.auth().user(&req.name).map(|u| u.roles.clone()).ok_or(AuthError::UserNotFound)?;
        Ok(Response::new(AuthUserGetResponse { header: self.ctx.header(None), roles }))
    }

    async fn user_list(&self, request: Request<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        self.ctx.require_admin(&request).await?;
        self.linearized().await?;
        let users = self.ctx.store.auth().user_names();
        Ok(Response::new(AuthUserListResponse { header: self.ctx.header(None), users }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let header = self.change(&caller, Change::UserDelete(request.into_inner())).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let mut req = request.into_inner();
        if req.hashed_password.is_empty() {
            req.hashed_password = self.hash(std::mem::take(&mut req.password)).await?;
        }
        req.password.clear();
        let header = self.change(&caller, Change::UserChangePassword(req)).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let header = self.change(&caller, Change::UserGrantRole(request.into_inner())).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let header = self.change(&caller, Change::UserRevokeRole(request.into_inner())).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(&self, request: Request<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let header = self.change(&caller, Change::RoleAdd(request.into_inner())).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(&self, request: Request<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        let caller = self.ctx.caller(&request).await?;
        let req = request.into_inner();
        {
            let auth = self.ctx.store.auth();
            let holds = auth.user(caller.name()).is_some_and(|u| u.roles.contains(&req.role));
            if !holds {
                auth.check_admin(caller.name())?;
            }
        }
        self.linearized().await?;
        let perm =
            self.ctx.store.auth().role(&req.role).map(|r| r.key_permission.clone()).ok_or(AuthError::RoleNotFound)?;
        Ok(Response::new(AuthRoleGetResponse { header: self.ctx.header(None), perm }))
    }

    async fn role_list(&self, request: Request<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        self.ctx.require_admin(&request).await?;
        self.linearized().await?;
        let roles = self.ctx.store.auth().role_names();
        Ok(Response::new(AuthRoleListResponse { header: self.ctx.header(None), roles }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let header = self.change(&caller, Change::RoleDelete(request.into_inner())).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let header = self.change(&caller, Change::RoleGrantPermission(request.into_inner())).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let caller = self.ctx.require_admin(&request).await?;
        let header = self.change(&caller, Change::RoleRevokePermission(request.into_inner())).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}
