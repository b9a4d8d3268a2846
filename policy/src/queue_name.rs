//! KumoMTA queue names, `campaign:tenant@domain!routing_domain`, in one place.
//!
//! The daemon builds names with [`QueueName::format`] when it spools an injection, and the
//! policy host reads them back with [`QueueName::parse`] before it calls
//! `get_queue_config(domain, tenant, campaign, routing_domain)`. The two are inverses
//! (a round-trip proptest checks it), and follow KumoMTA's `QueueNameComponents`: a
//! campaign without a tenant is written `campaign:@domain`.

/// The parts of a KumoMTA queue name: `campaign:tenant@domain!routing_domain`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueName {
    /// The destination domain; a bare name (`kafka`) is all domain.
    pub domain: Option<String>,
    /// The tenant, before the `@`.
    pub tenant: Option<String>,
    /// The campaign, before the `:` of the part before the `@`.
    pub campaign: Option<String>,
    /// The routing domain, after the `!`.
    pub routing_domain: Option<String>,
}

impl QueueName {
    /// Splits a queue name; a bare name (`kafka`) is all domain. Empty parts are `None`.
    pub fn parse(name: &str) -> QueueName {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let (name, routing_domain) = match name.split_once('!') {
            Some((n, r)) => (n, some(r)),
            None => (name, None),
        };
        let (campaign, tenant, domain) = match name.split_once('@') {
            None => (None, None, some(name)),
            Some((prefix, domain)) => match prefix.split_once(':') {
                Some((campaign, tenant)) => (some(campaign), some(tenant), some(domain)),
                None => (None, some(prefix), some(domain)),
            },
        };
        QueueName {
            domain,
            tenant,
            campaign,
            routing_domain,
        }
    }

    /// Writes the name back: `campaign:tenant@domain!routing_domain`, leaving out the
    /// parts that are `None` (or empty) with their separators, except that a campaign
    /// without a tenant keeps its `:@` (`campaign:@domain`), so [`QueueName::parse`] reads
    /// it as a campaign.
    pub fn format(&self) -> String {
        let mut name = String::new();
        match (part(&self.campaign), part(&self.tenant)) {
            (Some(campaign), tenant) => {
                name.push_str(campaign);
                name.push(':');
                name.push_str(tenant.unwrap_or(""));
                name.push('@');
            }
            (None, Some(tenant)) => {
                name.push_str(tenant);
                name.push('@');
            }
            (None, None) => {}
        }
        name.push_str(part(&self.domain).unwrap_or(""));
        if let Some(routing) = part(&self.routing_domain) {
            name.push('!');
            name.push_str(routing);
        }
        name
    }
}

/// A part of a name if it is set and not empty.
fn part(p: &Option<String>) -> Option<&str> {
    p.as_deref().filter(|s| !s.is_empty())
}

impl std::fmt::Display for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.format())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn qn(c: Option<&str>, t: Option<&str>, d: &str, r: Option<&str>) -> QueueName {
        let s = |x: Option<&str>| x.map(str::to_string);
        QueueName {
            domain: s(Some(d)),
            tenant: s(t),
            campaign: s(c),
            routing_domain: s(r),
        }
    }

    /// The four forms of KumoMTA's queue-name table (docs/reference/queues.md in KumoMTA:
    /// tenant and campaign set or not), each with and without a routing domain: each name,
    /// its parts, and back.
    #[test]
    fn kumo_examples_parse_and_format() {
        let examples = [
            ("foo.com", qn(None, None, "foo.com", None)),
            ("tenant@foo.com", qn(None, Some("tenant"), "foo.com", None)),
            (
                "campaign:tenant@foo.com",
                qn(Some("campaign"), Some("tenant"), "foo.com", None),
            ),
            (
                "campaign:@foo.com",
                qn(Some("campaign"), None, "foo.com", None),
            ),
            (
                "foo.com!routing.com",
                qn(None, None, "foo.com", Some("routing.com")),
            ),
            (
                "campaign:tenant@foo.com!routing.com",
                qn(
                    Some("campaign"),
                    Some("tenant"),
                    "foo.com",
                    Some("routing.com"),
                ),
            ),
            (
                "tenant@foo.com!routing.com",
                qn(None, Some("tenant"), "foo.com", Some("routing.com")),
            ),
            (
                "campaign:@foo.com!routing.com",
                qn(Some("campaign"), None, "foo.com", Some("routing.com")),
            ),
        ];
        for (name, parts) in examples {
            assert_eq!(QueueName::parse(name), parts, "parse({name:?})");
            assert_eq!(parts.format(), name, "format({parts:?})");
        }
    }

    #[test]
    fn empty_parts_are_none() {
        let none = QueueName::default();
        assert_eq!(QueueName::parse(":@d"), qn(None, None, "d", None));
        assert_eq!(QueueName::parse(""), none);
        assert_eq!(none.format(), "");
    }

    /// A part of a name: anything without the separators `:`, `@` and `!`.
    fn part() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._\\-]{1,12}"
    }

    proptest! {
        #[test]
        fn parse_reads_back_what_format_wrote(
            campaign in proptest::option::of(part()),
            tenant in proptest::option::of(part()),
            domain in part(),
            routing_domain in proptest::option::of(part()),
        ) {
            let name = QueueName { domain: Some(domain), tenant, campaign, routing_domain };
            let text = name.format();
            prop_assert_eq!(QueueName::parse(&text), name);
            prop_assert_eq!(QueueName::parse(&text).format(), text);
        }
    }
}
