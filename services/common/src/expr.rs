//! Herald's expression language: CEL (the Common Expression Language), compiled and evaluated
//! in this one place for every feature where a user writes logic: destination filters now;
//! integration mappings, audience conditions and transformations later.
//!
//! An expression is compiled once, when the config that holds it is written ([`Expr::compile`]
//! refuses an invalid one with its line and column), and evaluated per event
//! ([`Expr::eval_bool`]) with one variable bound: `event`, the event exactly as a destination
//! receives it (the activator's Segment-spec payload: `event.type`, `event.event`,
//! `event.properties`, `event.traits`, `event.context`, `event.integrations`,
//! `event.herald.consent`, ...).
//!
//! # JSON values in CEL
//!
//! JSON objects are CEL maps with string keys (`event.properties.plan` or
//! `event.properties["plan name"]`), arrays are lists, strings, booleans and `null` are
//! themselves. **Every JSON number is a CEL `double`**, whether it was written `12`, `12.0` or
//! `12.5`, as CEL does for JSON everywhere (`google.protobuf.Value`). So an expression behaves
//! the same whichever way a client serialised a number:
//! - comparisons and equality with an integer literal compare numerically:
//!   `event.properties.revenue > 10` and `event.properties.quantity == 3` hold for `12.5` and
//!   for `3` alike;
//! - arithmetic between two event fields always works (`double` with `double`); with a literal,
//!   write a double (`event.properties.price * 2.0 > 100`), or convert (`int(x) % 2 == 0`),
//!   since CEL does no implicit conversion in arithmetic;
//! - integers above 2^53 lose precision: compare identifiers as strings.
//!
//! A field that is absent is an evaluation error, not `false` nor `null`: guard with
//! `has(event.properties.coupon) && event.properties.coupon == "X"`. `has()` needs its parent to
//! exist (`has(event.properties)` first where the event type may lack `properties`). What an
//! error means is the caller's choice: a destination filter counts it and treats it as no match.
//!
//! The standard library is CEL's, with `matches()` (regular expressions) and without the
//! `timestamp` and `duration` types (not built in, to keep the time-zone database out of the
//! binary). Timestamps in the payload are RFC 3339 strings; comparing them as strings is not a
//! time comparison (the fractional seconds vary in length).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::common::types::{CelBool, CelDouble, CelList, CelMap, CelMapKey, CelNull, CelString};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;

/// The CEL environment every expression is compiled and evaluated with (the standard library,
/// built once per process).
static ENV: LazyLock<Arc<cel::Env>> = LazyLock::new(|| Arc::new(cel::Env::stdlib()));

/// The longest expression accepted, in bytes: config values, not programs.
pub const MAX_SOURCE_BYTES: usize = 4096;

/// Why an expression was refused or could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExprError {
    /// The expression does not parse. `line` and `column` start at 1.
    #[error("syntax error at {line}:{column}: {message}")]
    Syntax {
        /// Line of the first error.
        line: usize,
        /// Column of the first error (in characters).
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The expression names a variable that does not exist (only `event` does, and the
    /// variables of macros such as `exists(x, ...)`).
    #[error("unknown name `{name}` at {line}:{column}: the only variable is `event`")]
    UnknownName {
        /// The name.
        name: String,
        /// Its line.
        line: usize,
        /// Its column (in characters).
        column: usize,
    },
    /// The expression is longer than [`MAX_SOURCE_BYTES`].
    #[error("expression too long: {len} bytes, at most {MAX_SOURCE_BYTES}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The expression evaluated to something other than a bool where a condition was expected.
    #[error("expression must give a bool, it gave a {got}")]
    NotBool {
        /// The CEL type it gave (`int`, `string`, ...).
        got: String,
    },
    /// Evaluation failed on this input: a missing field, a type mismatch, a division by zero.
    /// The message names fields, functions and types, never a value of the event, so it can be
    /// logged.
    #[error("evaluation failed: {0}")]
    Eval(String),
}

impl ExprError {
    /// A bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ExprError::Syntax { .. } => "syntax",
            ExprError::UnknownName { .. } => "unknown_name",
            ExprError::TooLong { .. } => "too_long",
            ExprError::NotBool { .. } => "not_bool",
            ExprError::Eval(_) => "eval",
        }
    }
}

/// A compiled CEL expression. Cloning shares the compiled program.
#[derive(Clone)]
pub struct Expr {
    inner: Arc<Compiled>,
}

struct Compiled {
    source: String,
    program: cel::Program,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expr").field(&self.inner.source).finish()
    }
}

/// Two expressions are equal when their sources are.
impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.inner.source == other.inner.source
    }
}

impl Eq for Expr {}

impl Expr {
    /// Compiles `source`, refusing an invalid expression with the position of its first error
    /// (`syntax error at 1:14: ...`).
    pub fn compile(source: &str) -> Result<Expr, ExprError> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(ExprError::TooLong { len: source.len() });
        }
        let program = ENV.compile(source).map_err(|errors| {
            let first = errors.errors.first();
            let (line, column) = first.map_or((1, 1), |e| {
                (
                    usize::try_from(e.pos.0).unwrap_or(1).max(1),
                    usize::try_from(e.pos.1).unwrap_or(1).max(1),
                )
            });
            ExprError::Syntax {
                line,
                column,
                message: first.map_or_else(
                    || errors.to_string(),
                    |e| {
                        let msg = e.msg.strip_prefix("Syntax error: ").unwrap_or(&e.msg);
                        msg.to_string()
                    },
                ),
            }
        })?;
        check_names(&program)?;
        Ok(Expr {
            inner: Arc::new(Compiled {
                source: source.to_string(),
                program,
            }),
        })
    }

    /// The source the expression was compiled from.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Evaluates the expression as a condition, with the variable `event` bound to `event`, the
    /// payload JSON (see the module documentation for how JSON maps to CEL). A result that is
    /// not a bool is [`ExprError::NotBool`]; a failure such as a missing field is
    /// [`ExprError::Eval`].
    pub fn eval_bool(&self, event: &serde_json::Value) -> Result<bool, ExprError> {
        self.eval_bool_on(&Input::new(event))
    }

    /// [`Expr::eval_bool`] on an input converted once, for evaluating several expressions
    /// (one per destination) on the same event.
    pub fn eval_bool_on(&self, input: &Input<'_>) -> Result<bool, ExprError> {
        let mut ctx = cel::Context::with_env(ENV.clone());
        ctx.set_variable_resolver(input);
        let value = cel::Value::resolve_val(self.inner.program.expression(), &ctx)
            .map_err(|e| ExprError::Eval(describe(&e)))?;
        match value.downcast_ref::<CelBool>() {
            Some(b) => Ok(*b.inner()),
            None => Err(ExprError::NotBool {
                got: value.get_type().name().to_string(),
            }),
        }
    }
}

/// An event converted to CEL values once, to evaluate any number of expressions on; its
/// strings borrow the JSON's.
#[derive(Debug)]
pub struct Input<'a> {
    event: Box<dyn Val + 'a>,
}

impl<'a> Input<'a> {
    /// Converts `event` (see the module documentation for the mapping).
    pub fn new(event: &'a serde_json::Value) -> Self {
        Input {
            event: to_cel(event),
        }
    }
}

impl VariableResolver for Input<'_> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        (variable == VARIABLE).then(|| CowVal::Borrowed(self.event.as_ref()))
    }
}

/// JSON to CEL: objects are string-keyed maps, every number is a `double`.
fn to_cel(v: &serde_json::Value) -> Box<dyn Val + '_> {
    use serde_json::Value as J;
    match v {
        J::Null => Box::new(CelNull),
        J::Bool(b) => Box::new(CelBool::from(*b)),
        J::Number(n) => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        J::String(s) => Box::new(CelString::from(s.as_str())),
        J::Array(items) => Box::new(CelList::from(items.iter().map(to_cel).collect::<Vec<_>>())),
        J::Object(fields) => Box::new(CelMap::from(
            fields
                .iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), to_cel(v)))
                .collect::<HashMap<_, _>>(),
        )),
    }
}

/// An evaluation error in words that name fields, functions and types but never quote a value
/// of the event, so the message can be logged without customer data.
fn describe(e: &cel::ExecutionError) -> String {
    use cel::ExecutionError as X;
    let t = |v: &cel::Value| match v.type_of() {
        cel::objects::ValueType::Float => "double".to_string(),
        other => other.to_string(),
    };
    match e {
        X::InvalidArgumentCount { .. }
        | X::NoSuchKey(_)
        | X::NoSuchOverload(_)
        | X::UndeclaredReference(_)
        | X::MissingArgumentOrTarget
        | X::UnexpectedType { .. }
        | X::FunctionError { .. } => e.to_string(),
        X::ValuesNotComparable(a, b) => format!("can not compare ({}, {})", t(a), t(b)),
        X::UnsupportedBinaryOperator(op, a, b) => {
            format!("operator '{op}' not defined for ({}, {})", t(a), t(b))
        }
        X::Overflow(op, a, b) => format!("overflow in '{op}' on ({}, {})", t(a), t(b)),
        X::UnsupportedIndex(i, v) => format!("can not index a {} with a {}", t(v), t(i)),
        X::UnsupportedTargetType { target } => format!("unsupported argument type {}", t(target)),
        X::NotSupportedAsMethod { method, target } => {
            format!("method '{method}' not supported on type {}", t(target))
        }
        X::UnsupportedKeyType(v) => format!("a {} can not be a map key", t(v)),
        X::DivisionByZero(_) => "division by zero".into(),
        X::RemainderByZero(_) => "remainder by zero".into(),
        X::IndexOutOfBounds(_) => "index out of bounds".into(),
        X::DuplicateKey(_) => "repeated key in a map literal".into(),
        _ => "evaluation failed".into(),
    }
}

/// The variable every expression is evaluated with.
const VARIABLE: &str = "event";

/// Namespaces of the standard library's functions (`optional.of(...)`).
const NAMESPACES: &[&str] = &["optional"];

/// Refuses a name that no evaluation could resolve (a typo such as `evnt.type` or
/// `properties.x`), at compile time and with its position, rather than on every event.
fn check_names(program: &cel::Program) -> Result<(), ExprError> {
    let mut bound = vec![VARIABLE.to_string()];
    match free_name(program.expression(), &mut bound, false) {
        None => Ok(()),
        Some((id, name)) => {
            let info = program.source_info();
            let offset = info.offset_for(id).map_or(0, |(start, _)| start as usize);
            let (line, column) = line_column(&info.source, offset);
            Err(ExprError::UnknownName { name, line, column })
        }
    }
}

/// The first identifier of `e` that is neither bound nor a type (nor, as a call's target, a
/// function namespace), with its node id.
fn free_name(
    e: &cel::IdedExpr,
    bound: &mut Vec<String>,
    call_target: bool,
) -> Option<(u64, String)> {
    use cel::common::ast::{EntryExpr, Expr as E};
    let entry = |entry: &EntryExpr, bound: &mut Vec<String>| match entry {
        EntryExpr::StructField(f) => free_name(&f.value, bound, false),
        EntryExpr::MapEntry(m) => {
            free_name(&m.key, bound, false).or_else(|| free_name(&m.value, bound, false))
        }
    };
    match &e.expr {
        E::Unspecified | E::Literal(_) => None,
        E::Ident(name) => {
            let known = name.starts_with('@')
                || bound.iter().any(|b| b == name)
                || ENV.types().find_type(name).is_some()
                || (call_target && NAMESPACES.contains(&name.as_str()));
            (!known).then(|| (e.id, name.clone()))
        }
        E::Select(s) => free_name(&s.operand, bound, call_target),
        E::Call(c) => c
            .target
            .as_deref()
            .and_then(|t| free_name(t, bound, true))
            .or_else(|| c.args.iter().find_map(|a| free_name(a, bound, false))),
        E::List(l) => l.elements.iter().find_map(|x| free_name(x, bound, false)),
        E::Map(m) => m.entries.iter().find_map(|x| entry(&x.expr, bound)),
        E::Struct(s) => s.entries.iter().find_map(|x| entry(&x.expr, bound)),
        E::Comprehension(c) => {
            let outer = free_name(&c.iter_range, bound, false)
                .or_else(|| free_name(&c.accu_init, bound, false));
            if outer.is_some() {
                return outer;
            }
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            let inner = [&c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .find_map(|x| free_name(x, bound, false));
            bound.truncate(depth);
            inner
        }
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `source`.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// An event shaped as the activator's payload (see its golden file).
    fn event() -> Value {
        json!({
            "type": "track",
            "event": "Order Completed",
            "messageId": "msg-1",
            "userId": "user-42",
            "properties": {
                "revenue": 19.99,
                "quantity": 3,
                "big": 12,
                "small": 9.5,
                "currency": "EUR",
                "vip": true,
                "coupon": null,
                "tags": ["sale", "spring"],
                "items": [{"sku": "A-1", "price": 10}, {"sku": "B-2", "price": 9.99}],
                "plan name": "pro"
            },
            "context": {"ip": "203.0.113.9", "library": {"name": "analytics-python"}},
            "integrations": {"All": true},
            "herald": {
                "eventId": "web:msg-1",
                "consent": {"purposes": {"advertising": false, "analytics": true}, "optedOut": false}
            }
        })
    }

    #[test]
    fn conditions_on_the_payload() {
        let ev = event();
        let cases: &[(&str, bool)] = &[
            // strings
            (r#"event.type == "track""#, true),
            (r#"event.event == "Order Completed""#, true),
            (r#"event.event.startsWith("Order")"#, true),
            (r#"event.properties.currency != "EUR""#, false),
            (r#"event.context.library.name.matches("^analytics-")"#, true),
            (r#"event.properties["plan name"] == "pro""#, true),
            // numbers: JSON integers and floats compare with int and double literals alike
            ("event.properties.revenue > 10", true),
            ("event.properties.revenue > 10.0", true),
            ("event.properties.revenue < 19", false),
            ("event.properties.big > 10", true),
            ("event.properties.small > 10", false),
            ("event.properties.quantity == 3", true),
            ("event.properties.quantity == 3.0", true),
            (
                "event.properties.quantity >= 3 && event.properties.quantity < 4",
                true,
            ),
            ("event.properties.revenue * 2.0 > 39.0", true),
            (
                "event.properties.quantity * event.properties.small > 28.0",
                true,
            ),
            ("int(event.properties.quantity) % 2 == 1", true),
            // bool and null
            ("event.properties.vip", true),
            ("!event.properties.vip", false),
            ("event.properties.coupon == null", true),
            // lists and maps
            (r#""sale" in event.properties.tags"#, true),
            (r#""winter" in event.properties.tags"#, false),
            ("size(event.properties.items) == 2", true),
            (r#"event.properties.items[0].sku == "A-1""#, true),
            ("event.properties.items.exists(i, i.price > 9.995)", true),
            ("event.properties.items.all(i, i.price > 9.995)", false),
            (r#""currency" in event.properties"#, true),
            (r#""discount" in event.properties"#, false),
            (
                r#"event.event in ["Order Completed", "Order Refunded"]"#,
                true,
            ),
            // has()
            ("has(event.properties.currency)", true),
            ("has(event.properties.discount)", false),
            ("has(event.properties.coupon)", true),
            ("has(event.traits)", false),
            (
                r#"has(event.properties.discount) && event.properties.discount > 0"#,
                false,
            ),
            // consent as the destination sees it
            ("event.herald.consent.purposes.analytics", true),
            (
                r#"event.herald.consent.purposes.advertising || event.herald.consent.optedOut"#,
                false,
            ),
        ];
        for (source, want) in cases {
            let expr = Expr::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            let got = expr
                .eval_bool(&ev)
                .unwrap_or_else(|e| panic!("{source}: {e}"));
            assert_eq!(got, *want, "{source}");
        }
    }

    #[test]
    fn invalid_expressions_are_refused_with_their_position() {
        let cases: &[(&str, usize, usize)] = &[
            ("event.type ==", 1, 14),
            ("event.properties.revenue > > 10", 1, 28),
            ("event.type == \"track\" &&\n  event.event ==", 2, 17),
            ("(event.type", 1, 12),
            ("event.type == 'track", 1, 15),
            ("", 1, 1),
        ];
        for (source, line, column) in cases {
            let err = Expr::compile(source).expect_err(source);
            assert_eq!(err.kind(), "syntax", "{source}: {err}");
            let ExprError::Syntax {
                line: l, column: c, ..
            } = &err
            else {
                panic!("{source}: {err:?}");
            };
            assert_eq!((*l, *c), (*line, *column), "{source}: {err}");
            let prefix = format!("syntax error at {line}:{column}: ");
            assert!(err.to_string().starts_with(&prefix), "{source}: {err}");
            assert!(!err.to_string().contains("Syntax error"), "{err}");
        }
        let long = "true && ".repeat(MAX_SOURCE_BYTES / 8) + "true";
        assert_eq!(
            Expr::compile(&long).expect_err("too long").kind(),
            "too_long"
        );
    }

    #[test]
    fn unknown_names_are_refused_with_their_position() {
        let cases: &[(&str, &str, usize, usize)] = &[
            ("evnt.type == \"track\"", "evnt", 1, 1),
            ("properties.revenue > 10", "properties", 1, 1),
            (
                "event.type == \"track\" && has(traits.email)",
                "traits",
                1,
                30,
            ),
            ("event.type == track", "track", 1, 15),
            ("\"é\" == event.type ||\n  x > 1", "x", 2, 3),
            ("\"é\" == evnt.type", "evnt", 1, 8),
            ("[1, 2].exists(x, x > y)", "y", 1, 22),
            ("[1].all(x, x > 0) && x > 0", "x", 1, 22),
            ("{\"a\": b}.a", "b", 1, 7),
            ("size(evnt) > 0", "evnt", 1, 6),
            (
                "event.properties.tags.filter(t, t == tag).size() > 0",
                "tag",
                1,
                38,
            ),
        ];
        for (source, name, line, column) in cases {
            let err = Expr::compile(source).expect_err(source);
            assert_eq!(
                err,
                ExprError::UnknownName {
                    name: name.to_string(),
                    line: *line,
                    column: *column
                },
                "{source}: {err}"
            );
            assert_eq!(err.kind(), "unknown_name");
        }
        // Bound names, types and namespaces are known.
        for source in [
            "event.properties.items.exists(i, i.price > 10)",
            "event.properties.items.map(i, i.price).all(p, p > 0)",
            "[1, 2].exists_one(x, x == 1)",
            "type(event.type) == string && type(1) == int && type(null) == null_type",
            "optional.of(1).hasValue()",
            "event.properties.tags.map(t, [t].exists(u, u == t)).all(b, b)",
        ] {
            Expr::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        }
    }

    #[test]
    fn missing_fields_and_type_errors_are_eval_errors() {
        let ev = event();
        for source in [
            "event.properties.discount > 0",
            "event.traits.email == \"a@b.c\"",
            "has(event.traits.email)",
            "event.properties.currency > 1",
            "event.properties.quantity * 2 > 1",
            "event.properties.items[5].sku == \"x\"",
        ] {
            let expr = Expr::compile(source).expect(source);
            let err = expr.eval_bool(&ev).expect_err(source);
            assert_eq!(err.kind(), "eval", "{source}: {err}");
            assert!(err.to_string().starts_with("evaluation failed: "), "{err}");
        }
    }

    #[test]
    fn evaluation_errors_name_fields_and_types_never_values() {
        let ev =
            json!({"properties": {"email": "ann@example.com", "n": 7.5, "tags": ["secret-tag"]}});
        for source in [
            "event.properties.email > 1",
            "event.properties.email + 1 == \"x\"",
            "event.properties.n + 1 > 1.0",
            "1 / 0 == 1",
            "event.properties.tags[3] == \"x\"",
            "event.properties.tags[event.properties.email] == \"x\"",
            "event.properties.email.size() > event.properties.tags",
            "event.properties.missing == 1",
        ] {
            let err = Expr::compile(source)
                .expect(source)
                .eval_bool(&ev)
                .expect_err(source);
            let text = err.to_string();
            for value in ["ann@example", "7.5", "secret-tag"] {
                assert!(!text.contains(value), "{source}: {text}");
            }
        }
    }

    #[test]
    fn a_result_that_is_not_a_bool_is_refused_at_evaluation() {
        let ev = event();
        for (source, got) in [
            ("event.properties.quantity", "double"),
            ("event.type", "string"),
            ("event.properties.tags", "list"),
            ("event.context", "map"),
            ("event.properties.coupon", "null_type"),
            ("1 + 2", "int"),
        ] {
            let err = Expr::compile(source)
                .expect(source)
                .eval_bool(&ev)
                .expect_err(source);
            assert_eq!(err.kind(), "not_bool", "{source}: {err}");
            assert_eq!(
                err,
                ExprError::NotBool {
                    got: got.to_string()
                },
                "{source}"
            );
        }
    }

    #[test]
    fn one_compiled_expression_is_shared_and_reused() {
        let expr = Expr::compile("event.properties.revenue > 10").expect("compiles");
        let copy = expr.clone();
        assert!(Arc::ptr_eq(&expr.inner, &copy.inner));
        assert_eq!(copy.source(), "event.properties.revenue > 10");
        assert_eq!(expr, copy);
        let payload = json!({"properties": {"revenue": 12}});
        let input = Input::new(&payload);
        let other = Expr::compile("event.properties.revenue < 100").expect("compiles");
        assert_eq!(expr.eval_bool_on(&input), Ok(true));
        assert_eq!(other.eval_bool_on(&input), Ok(true));
        let handle =
            std::thread::spawn(move || copy.eval_bool(&json!({"properties": {"revenue": 5}})));
        assert_eq!(handle.join().expect("thread"), Ok(false));
    }
}
