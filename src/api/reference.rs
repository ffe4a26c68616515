//! Image references as users write them in `spec.cache.pins`: `registry/repository:tag` or
//! `registry/repository@sha256:...`, and which upstream (and repository in its proxy) they name.

use super::{RegistryMirrorSpec, Upstream};

/// What a reference names inside one upstream's proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry host as written (`docker.io`, `ghcr.io`, `host:5000`).
    pub registry: String,
    /// The repository as the proxy stores it (Docker Hub's one-segment names get `library/`).
    pub repository: String,
    pub target: Target,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tag(String),
    Digest(String),
}

impl ImageRef {
    /// Parses `registry/repository(:tag|@sha256:hex)`; the registry part is required.
    pub fn parse(text: &str) -> Result<ImageRef, String> {
        let (registry, rest) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} has no registry: write it as registry/repository:tag"))?;
        if registry.is_empty() || !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(format!("{text:?} does not start with a registry host (docker.io/..., ghcr.io/...)"));
        }
        let (repository, target) = if let Some((repo, digest)) = rest.split_once('@') {
            let hex = digest.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(format!("{text:?}: {digest:?} is not a sha256 digest"));
            }
            (repo, Target::Digest(digest.to_string()))
        } else {
            // The tag is after the last ':' that follows the last '/'.
            let (repo, tag) = match rest.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo, tag),
                _ => return Err(format!("{text:?} names no tag or digest (add :tag or @sha256:...)")),
            };
            let tag_ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .enumerate()
                    .all(|(i, b)| b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-')));
            if !tag_ok {
                return Err(format!("{text:?}: {tag:?} is not a valid tag"));
            }
            (repo, Target::Tag(tag.to_string()))
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-')
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if repository.is_empty() || !repository.split('/').all(component_ok) {
            return Err(format!("{text:?}: {repository:?} is not a repository name"));
        }
        let repository = if is_docker_hub(registry) && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        Ok(ImageRef { registry: registry.to_string(), repository, target })
    }

    /// The upstream of `spec` this reference's registry is served by.
    pub fn upstream<'a>(&self, spec: &'a RegistryMirrorSpec) -> Option<&'a Upstream> {
        spec.upstreams
            .iter()
            .find(|u| u.registry == self.registry || (is_docker_hub(&u.registry) && is_docker_hub(&self.registry)))
    }

    /// `repository:tag` or `repository@digest`: the reference inside the upstream's proxy.
    pub fn in_proxy(&self) -> String {
        match &self.target {
            Target::Tag(t) => format!("{}:{t}", self.repository),
            Target::Digest(d) => format!("{}@{d}", self.repository),
        }
    }
}

fn is_docker_hub(registry: &str) -> bool {
    matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_users_write_them() {
        let r = ImageRef::parse("docker.io/nginx:1.27").unwrap();
        assert_eq!((r.registry.as_str(), r.in_proxy().as_str()), ("docker.io", "library/nginx:1.27"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("ghcr.io/org/app@{d}")).unwrap();
        assert_eq!(r.in_proxy(), format!("org/app@{d}"));
        assert_eq!(ImageRef::parse("registry.local:5000/team/x:v1").unwrap().in_proxy(), "team/x:v1");
        for bad in [
            "nginx:1.27",
            "docker.io/nginx",
            "docker.io/Nginx:1",
            "ghcr.io/x@sha256:12",
            "ghcr.io/x:-bad",
            "quay.io/:t",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
