//! An in-process API server double for request-level tests of the reconcile.
//!
//! It keeps objects as JSON by resource, namespace and name, and answers the requests the
//! controller makes: get, list (label selectors; full or metadata-only), server-side apply
//! (main resource and status), JSON merge patch (with a resourceVersion precondition), create,
//! and delete (with a uid precondition); writes to a resource can be made to fail. It records
//! every request so tests can count writes and look at what was sent. Like the real API server,
//! an apply that changes nothing keeps the resourceVersion, and `managedFields` carries one entry
//! per manager, the status subresource's apart. Services get a cluster IP. It does not run
//! controllers: tests set Deployment and DaemonSet status themselves.
//!
//! Like an API server whose client holds no `bind` verb, it writes a RoleBinding only when the
//! Role it references exists (RBAC's escalation check resolves the Role), and answers NotFound
//! otherwise. Writes to a resource can be made slow ([`FakeApi::slow_writes`]) and every request
//! is also kept with when it arrived and when it was answered ([`FakeApi::exchanges`]), so tests
//! can see the order of concurrent requests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: Option<Value>,
}

/// When one request arrived and when it was answered, as positions in the server's one sequence
/// of arrivals and answers.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub sent: u64,
    /// None while the request is in flight.
    pub done: Option<u64>,
}

impl Recorded {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
    /// `plural` (or `plural/sub`) of the request path.
    pub fn resource(&self) -> String {
        mirrorfleet::controller::metrics::resource_of(&self.path)
    }
    pub fn name(&self) -> Option<String> {
        let p = parse_path(&self.path)?;
        p.name
    }
}

#[derive(Default)]
struct State {
    /// (group/version/plural, namespace, name) -> object
    objects: BTreeMap<(String, String, String), Value>,
    rv: u64,
    uid: u64,
    clock: u64,
    requests: Vec<Recorded>,
    /// Resources (`group/version/plural`) the server does not serve, like a CRD not installed.
    unserved: Vec<String>,
    /// Resources whose writes fail: (resource, code, reason, message); `{body}` in the message
    /// stands for the body sent, as a webhook quoting its input would answer.
    failing: Vec<(String, u16, String, String)>,
    /// Resources whose writes take this long to answer.
    slow: Vec<(String, Duration)>,
    /// The sequence of arrivals and answers, and every request's place in it.
    seq: u64,
    exchanges: Vec<Exchange>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

struct ParsedPath {
    resource: String,
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<ParsedPath> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match *segs.first()? {
        "api" => (format!("/{}", segs.get(1)?), &segs[2..]),
        "apis" => (format!("{}/{}", segs.get(1)?, segs.get(2)?), &segs[3..]),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    Some(ParsedPath {
        resource: format!("{gv}/{}", rest.first()?),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn selector_matches(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector.split(',').filter(|s| !s.is_empty()).all(|term| match term.split_once('=') {
        Some((k, v)) => labels.get(k).and_then(Value::as_str) == Some(v),
        None => labels.get(term).is_some(),
    })
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    Response::builder().status(code).body(Body::from(body.to_string().into_bytes())).unwrap()
}

fn ok(value: &Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(value.to_string().into_bytes()))
        .unwrap()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = json!({});
        }
        let t = target.as_object_mut().unwrap();
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

const ROLES: &str = "rbac.authorization.k8s.io/v1/roles";
const ROLE_BINDINGS: &str = "rbac.authorization.k8s.io/v1/rolebindings";

fn kind_of_list(plural: &str) -> &'static str {
    match plural {
        "deployments" => "DeploymentList",
        "services" => "ServiceList",
        _ => "List",
    }
}

impl State {
    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }
    fn now(&mut self) -> String {
        self.clock += 1;
        let n = self.clock;
        format!("2026-01-01T{:02}:{:02}:{:02}Z", (n / 3600) % 24, (n / 60) % 60, n % 60)
    }

    fn touch_managed(&mut self, obj: &mut Value, manager: &str, operation: &str, subresource: Option<&str>) {
        let time = self.now();
        let entries = obj["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
        let mut entries: Vec<Value> = entries
            .into_iter()
            .filter(|e| !(e["manager"] == manager && e.get("subresource").and_then(Value::as_str) == subresource))
            .collect();
        let mut entry = json!({"manager": manager, "operation": operation, "apiVersion": obj["apiVersion"].clone(),
                               "time": time, "fieldsType": "FieldsV1", "fieldsV1": {}});
        if let Some(s) = subresource {
            entry["subresource"] = json!(s);
        }
        entries.push(entry);
        obj["metadata"]["managedFields"] = Value::Array(entries);
    }

    /// Creates `obj` as new: uid, resourceVersion, generation, creationTimestamp.
    fn create(&mut self, resource: &str, namespace: &str, mut obj: Value, manager: &str, operation: &str) -> Value {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        self.uid += 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", self.uid));
        obj["metadata"]["resourceVersion"] = json!(self.next_rv());
        obj["metadata"]["generation"] = json!(1);
        obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        if !namespace.is_empty() {
            obj["metadata"]["namespace"] = json!(namespace);
        }
        if resource.ends_with("/services") && obj["spec"]["clusterIP"].is_null() {
            obj["spec"]["clusterIP"] = json!(format!("10.96.0.{}", self.uid % 250 + 2));
        }
        self.touch_managed(&mut obj, manager, operation, None);
        self.objects.insert((resource.to_string(), namespace.to_string(), name), obj.clone());
        obj
    }

    fn handle(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        ct: Option<&str>,
        accept: Option<&str>,
        body: Option<Value>,
    ) -> Response<Body> {
        let Some(p) = parse_path(path) else { return status_response(404, "NotFound", "unknown path") };
        if self.unserved.contains(&p.resource) {
            return status_response(404, "NotFound", "the server could not find the requested resource");
        }
        if method != "GET" {
            if let Some((_, code, reason, message)) = self.failing.iter().find(|f| f.0 == p.resource) {
                let sent = body.as_ref().map(Value::to_string).unwrap_or_default();
                return status_response(*code, reason, &message.replace("{body}", &sent));
            }
        }
        if let Some(refused) = self.unresolved_role(method, &p, body.as_ref()) {
            return refused;
        }
        let key = |name: &str| (p.resource.clone(), p.namespace.clone(), name.to_string());
        match (method, &p.name) {
            ("GET", None) => {
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((r, ns, _), _)| *r == p.resource && (p.namespace.is_empty() || *ns == p.namespace))
                    .filter(|(_, o)| selector_matches(&selector, o))
                    .map(|(_, o)| o.clone())
                    .collect();
                let meta_only = accept.is_some_and(|a| a.contains("PartialObjectMetadataList"));
                let list = if meta_only {
                    let items: Vec<Value> = items
                        .into_iter()
                        .map(|o| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]}))
                        .collect();
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                           "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})
                } else {
                    let plural = p.resource.rsplit('/').next().unwrap_or_default();
                    json!({"apiVersion": "v1", "kind": kind_of_list(plural),
                           "metadata": {"resourceVersion": self.rv.to_string()}, "items": items})
                };
                ok(&list)
            }
            ("GET", Some(name)) => match self.objects.get(&key(name)) {
                Some(o) => ok(o),
                None => status_response(404, "NotFound", &format!("{} {name:?} not found", p.resource)),
            },
            ("POST", None) => {
                let Some(obj) = body else { return status_response(400, "BadRequest", "no body") };
                let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
                if self.objects.contains_key(&key(&name)) {
                    return status_response(409, "AlreadyExists", "exists");
                }
                let created = self.create(&p.resource, &p.namespace, obj, "test", "Update");
                ok(&created)
            }
            ("PATCH", Some(name)) => {
                let Some(patch) = body else { return status_response(400, "BadRequest", "no body") };
                let manager = query_param(query, "fieldManager").unwrap_or_else(|| "unknown".into());
                let apply = ct.is_some_and(|c| c.starts_with("application/apply-patch"));
                let existing = self.objects.get(&key(name)).cloned();
                match (existing, apply, p.subresource.as_deref()) {
                    (None, true, None) => {
                        let created = self.create(&p.resource, &p.namespace, patch, &manager, "Apply");
                        ok(&created)
                    }
                    (None, _, _) => status_response(404, "NotFound", &format!("{name:?} not found")),
                    (Some(old), true, sub) => {
                        let mut new = old.clone();
                        if sub == Some("status") {
                            new["status"] = patch["status"].clone();
                        } else {
                            if let Some(fields) = patch.as_object() {
                                for (k, v) in fields {
                                    if k != "metadata" && k != "status" {
                                        new[k] = v.clone();
                                    }
                                }
                            }
                            for f in ["labels", "annotations", "ownerReferences"] {
                                new["metadata"][f] = patch["metadata"][f].clone();
                            }
                        }
                        self.finish_write(&key(name), old, new, &manager, "Apply", sub)
                    }
                    (Some(old), false, sub) => {
                        if let Some(want) = patch["metadata"]["resourceVersion"].as_str() {
                            if old["metadata"]["resourceVersion"].as_str() != Some(want) {
                                return status_response(409, "Conflict", "the object has been modified");
                            }
                        }
                        let mut new = old.clone();
                        merge_patch(&mut new, &patch);
                        self.finish_write(&key(name), old, new, &manager, "Update", sub)
                    }
                }
            }
            ("DELETE", Some(name)) => {
                let Some(old) = self.objects.get(&key(name)).cloned() else {
                    return status_response(404, "NotFound", &format!("{name:?} not found"));
                };
                if let Some(uid) = body.as_ref().and_then(|b| b["preconditions"]["uid"].as_str()) {
                    if old["metadata"]["uid"].as_str() != Some(uid) {
                        return status_response(409, "Conflict", "uid precondition failed");
                    }
                }
                if old["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()) {
                    let mut new = old.clone();
                    new["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                    new["metadata"]["resourceVersion"] = json!(self.next_rv());
                    self.objects.insert(key(name), new.clone());
                    return ok(&new);
                }
                self.objects.remove(&key(name));
                ok(&json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}))
            }
            _ => status_response(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }

    /// RBAC's escalation check for a client without `bind`: a RoleBinding is written only if
    /// the Role it references resolves. The API server then answers as for the binding itself.
    fn unresolved_role(&self, method: &str, p: &ParsedPath, body: Option<&Value>) -> Option<Response<Body>> {
        if !matches!(method, "POST" | "PUT" | "PATCH") || p.resource != ROLE_BINDINGS || p.subresource.is_some() {
            return None;
        }
        let role_ref = &body?["roleRef"];
        let role = role_ref["name"].as_str()?;
        if role_ref["kind"] != "Role" || self.objects.contains_key(&(ROLES.into(), p.namespace.clone(), role.into())) {
            return None;
        }
        let name = p.name.clone().or_else(|| body?["metadata"]["name"].as_str().map(str::to_string))?;
        Some(status_response(404, "NotFound", &format!("rolebindings.rbac.authorization.k8s.io {name:?} not found")))
    }

    fn finish_write(
        &mut self,
        key: &(String, String, String),
        old: Value,
        mut new: Value,
        manager: &str,
        op: &str,
        sub: Option<&str>,
    ) -> Response<Body> {
        let strip = |v: &Value| {
            let mut v = v.clone();
            v["metadata"]["resourceVersion"] = Value::Null;
            v["metadata"]["managedFields"] = Value::Null;
            v
        };
        if strip(&old) == strip(&new) {
            return ok(&old);
        }
        if sub.is_none() && old["spec"] != new["spec"] {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(g + 1);
        }
        new["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.touch_managed(&mut new, manager, op, sub);
        // A deleting object whose finalizers are all gone is removed.
        if new["metadata"]["deletionTimestamp"].is_string()
            && new["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty())
        {
            self.objects.remove(key);
            return ok(&new);
        }
        self.objects.insert(key.clone(), new.clone());
        ok(&new)
    }
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }
    pub fn clear_requests(&self) {
        let mut st = self.state.lock().unwrap();
        st.requests.clear();
        st.exchanges.clear();
    }
    /// When each request so far arrived and was answered.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.state.lock().unwrap().exchanges.clone()
    }
    pub fn writes(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(Recorded::is_write).collect()
    }

    /// Stores an object as a client would create it (`resource` is `group/version/plural`, core
    /// is `/v1/plural`).
    pub fn insert(&self, resource: &str, obj: Value) -> Value {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        self.state.lock().unwrap().create(resource, &ns, obj, "kubectl-create", "Update")
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(&(resource.to_string(), ns.to_string(), name.to_string())).cloned()
    }

    /// Changes an object as another client would (`manager`), bumping resourceVersion and its
    /// managedFields entry, through `subresource` (`status`, `scale`) when given.
    pub fn edit(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        manager: &str,
        subresource: Option<&str>,
        f: impl FnOnce(&mut Value),
    ) {
        let mut st = self.state.lock().unwrap();
        let key = (resource.to_string(), ns.to_string(), name.to_string());
        let mut obj = st.objects.get(&key).cloned().unwrap_or_else(|| panic!("no {resource} {ns}/{name}"));
        f(&mut obj);
        obj["metadata"]["resourceVersion"] = json!(st.next_rv());
        st.touch_managed(&mut obj, manager, "Update", subresource);
        st.objects.insert(key, obj);
    }

    /// Refuses every write to `resource` with 422 and `message`, as an admission webhook would.
    pub fn refuse(&self, resource: &str, message: &str) {
        self.fail_writes(resource, 422, "Invalid", message);
    }

    /// Answers every write to `resource` with `code`, `reason` and `message` (`{body}` in it
    /// stands for the body sent), until [`FakeApi::heal`].
    pub fn fail_writes(&self, resource: &str, code: u16, reason: &str, message: &str) {
        self.state.lock().unwrap().failing.push((resource.into(), code, reason.into(), message.into()));
    }

    /// Writes to `resource` succeed again.
    pub fn heal(&self, resource: &str) {
        self.state.lock().unwrap().failing.retain(|f| f.0 != resource);
    }

    /// Answers every write to `resource` only after `delay`, as a slow etcd would.
    pub fn slow_writes(&self, resource: &str, delay: Duration) {
        self.state.lock().unwrap().slow.push((resource.to_string(), delay));
    }

    /// Stops serving `resource`, as an API server without the CRD.
    pub fn unserve(&self, resource: &str) {
        self.state.lock().unwrap().unserved.push(resource.to_string());
    }

    pub fn remove(&self, resource: &str, ns: &str, name: &str) {
        self.state.lock().unwrap().objects.remove(&(resource.to_string(), ns.to_string(), name.to_string()));
    }
}

impl tower::Service<Request<Body>> for FakeApi {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let body: Option<Value> = if bytes.is_empty() { None } else { serde_json::from_slice(&bytes).ok() };
            let method = parts.method.as_str().to_string();
            let path = parts.uri.path().to_string();
            let query = parts.uri.query().unwrap_or_default().to_string();
            let header =
                |h: http::header::HeaderName| parts.headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
            let ct = header(http::header::CONTENT_TYPE);
            let accept = header(http::header::ACCEPT);
            let (sent, delay) = {
                let mut st = state.lock().unwrap();
                st.seq += 1;
                let sent = st.seq;
                st.requests.push(Recorded {
                    method: method.clone(),
                    path: path.clone(),
                    query: query.clone(),
                    content_type: ct.clone(),
                    body: body.clone(),
                });
                st.exchanges.push(Exchange { method: method.clone(), path: path.clone(), sent, done: None });
                let resource = parse_path(&path).map(|p| p.resource).unwrap_or_default();
                let delay = st.slow.iter().find(|(r, _)| method != "GET" && *r == resource).map(|(_, d)| *d);
                (sent, delay)
            };
            // Other requests go on meanwhile, as on a real API server.
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let mut st = state.lock().unwrap();
            let response = st.handle(&method, &path, &query, ct.as_deref(), accept.as_deref(), body);
            st.seq += 1;
            let done = st.seq;
            if let Some(e) = st.exchanges.iter_mut().find(|e| e.sent == sent) {
                e.done = Some(done);
            }
            Ok(response)
        })
    }
}
