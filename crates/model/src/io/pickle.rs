//! A restricted pickle machine for `torch.save` files. It builds plain values (numbers,
//! strings, tuples, lists, dicts) and resolves only the globals a state dict needs: OrderedDict,
//! torch's tensor and parameter rebuild functions, and the storage types. Every other global,
//! and every opcode that would run code (INST, OBJ, NEWOBJ of an unknown class, extensions), is
//! an error; nothing from the file is ever executed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::{ByteReader, DType};

/// A value on the pickle stack. Lists and dicts are shared, like Python objects, because the
/// memo hands out references that are filled in later (SETITEMS after BINPUT).
#[derive(Clone, Debug)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond i64, as little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Dict>>),
    Global(Global),
    /// What the persistent-load callback made of a persistent id.
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub(super) fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.to_vec()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    fn usize(&self, what: &str) -> Result<usize, String> {
        match self {
            Value::Int(i) => usize::try_from(*i).map_err(|_| format!("{what} {i} is negative")),
            v => Err(format!("{what} is a {}, not an int", v.kind())),
        }
    }

    fn usizes(&self, what: &str) -> Result<Vec<usize>, String> {
        let items = self
            .items()
            .ok_or_else(|| format!("{what} is a {}, not a tuple", self.kind()))?;
        items.iter().map(|v| v.usize(what)).collect()
    }
}

/// A dict in insertion order (Python dicts keep it), with an index for the usual key types.
#[derive(Debug, Default)]
pub(super) struct Dict {
    pub(super) entries: Vec<(Value, Value)>,
    index: HashMap<Key, usize>,
}

/// The hashable form of a dict key.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Key {
    None,
    Int(i64),
    Big(Vec<u8>),
    Float(u64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Key>),
}

impl Key {
    fn of(v: &Value) -> Result<Key, String> {
        Ok(match v {
            Value::None => Key::None,
            // True == 1 in Python, as keys too.
            Value::Bool(b) => Key::Int(i64::from(*b)),
            Value::Int(i) => Key::Int(*i),
            Value::BigInt(b) => Key::Big(b.to_vec()),
            Value::Float(f) => Key::Float(f.to_bits()),
            Value::Str(s) => Key::Str(s.to_string()),
            Value::Bytes(b) => Key::Bytes(b.to_vec()),
            Value::Tuple(t) => Key::Tuple(t.iter().map(Key::of).collect::<Result<_, _>>()?),
            v => return Err(format!("a {} as a dict key is not supported", v.kind())),
        })
    }
}

impl Dict {
    fn insert(&mut self, key: Value, value: Value) -> Result<(), String> {
        match self.index.entry(Key::of(&key)?) {
            std::collections::hash_map::Entry::Occupied(e) => self.entries[*e.get()].1 = value,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.entries.len());
                self.entries.push((key, value));
            }
        }
        Ok(())
    }

    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.index
            .get(&Key::Str(key.to_string()))
            .map(|&i| &self.entries[i].1)
    }
}

/// The globals a state dict may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    /// A typed storage class such as `torch.FloatStorage`.
    Storage(DType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", storage) => Global::Storage(match storage {
                "DoubleStorage" => DType::F64,
                "FloatStorage" => DType::F32,
                "HalfStorage" => DType::F16,
                "BFloat16Storage" => DType::BF16,
                "LongStorage" => DType::I64,
                "IntStorage" => DType::I32,
                "ShortStorage" => DType::I16,
                "CharStorage" => DType::I8,
                "ByteStorage" => DType::U8,
                "BoolStorage" => DType::Bool,
                _ => return None,
            }),
            _ => return None,
        })
    }
}

/// A storage from a persistent id: its key (the zip record `data/<key>`, or the legacy
/// storage key), its element type, and where a legacy view starts in it, in elements.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct StorageRef {
    pub(super) key: String,
    pub(super) dtype: DType,
    pub(super) elem_offset: usize,
}

/// A tensor as torch rebuilds it: a strided view into a storage (offset and strides in
/// elements).
#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: Rc<StorageRef>,
    pub(super) offset: usize,
    pub(super) shape: Vec<usize>,
    pub(super) stride: Vec<usize>,
}

/// Turns a persistent id into a value (a storage); supplied by the file format.
pub(super) type PersistentLoad<'a> = dyn FnMut(Value) -> Result<Value, String> + 'a;

/// Runs one pickle starting at `*pos` in `bytes` up to its STOP, leaves `*pos` just after it,
/// and returns the unpickled value.
pub(super) fn load(
    bytes: &[u8],
    pos: &mut usize,
    persistent_load: &mut PersistentLoad,
) -> Result<Value, String> {
    let mut m = Machine {
        r: ByteReader::new(bytes, *pos),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        persistent_load,
    };
    loop {
        let at = m.r.pos;
        let op = m.r.u8().map_err(|e| format!("pickle byte {at}: {e}"))?;
        match m.step(op) {
            Ok(Some(value)) => {
                *pos = m.r.pos;
                return Ok(value);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("pickle byte {at} (opcode {}): {e}", describe(op))),
        }
    }
}

fn describe(op: u8) -> String {
    if op.is_ascii_graphic() {
        format!("{:?}", op as char)
    } else {
        format!("0x{op:02x}")
    }
}

struct Machine<'a, 'p> {
    r: ByteReader<'a>,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    persistent_load: &'p mut PersistentLoad<'p>,
}

impl Machine<'_, '_> {
    fn pop(&mut self) -> Result<Value, String> {
        match self.marks.last() {
            Some(&m) if self.stack.len() <= m => Err("stack underflow (pop past a mark)".into()),
            _ => self.stack.pop().ok_or_else(|| "stack underflow".into()),
        }
    }

    fn top(&self) -> Result<&Value, String> {
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    /// The items pushed since the last MARK, removing the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        Ok(self.stack.split_off(m))
    }

    fn line(&mut self) -> Result<&str, String> {
        let rest = &self.r.bytes[self.r.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated text line")?;
        let line = self.r.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| "text line is not UTF-8".to_string())
    }

    fn string(&mut self, n: u64) -> Result<Value, String> {
        let n = super::to_usize(n, "string length")?;
        let s = std::str::from_utf8(self.r.take(n)?)
            .map_err(|_| "string is not valid UTF-8".to_string())?;
        Ok(Value::Str(s.into()))
    }

    /// A Python 2 `str`: UTF-8 when it is, else Latin-1 (what torch loads it as).
    fn py2_string(&mut self, n: u64) -> Result<Value, String> {
        let bytes = self.r.take(super::to_usize(n, "string length")?)?;
        Ok(Value::Str(match std::str::from_utf8(bytes) {
            Ok(s) => s.into(),
            Err(_) => bytes.iter().map(|&b| b as char).collect::<String>().into(),
        }))
    }

    fn bytes(&mut self, n: u64) -> Result<Value, String> {
        Ok(Value::Bytes(
            self.r.take(super::to_usize(n, "bytes length")?)?.into(),
        ))
    }

    fn memo_get(&self, i: u64) -> Result<Value, String> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo slot {i} is empty"))
    }

    fn memo_put(&mut self, i: u64) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn push_tuple(&mut self, n: usize) -> Result<(), String> {
        if self.stack.len() < n || self.marks.last().is_some_and(|&m| self.stack.len() - n < m) {
            return Err("stack underflow".into());
        }
        let items = self.stack.split_off(self.stack.len() - n);
        self.stack.push(Value::Tuple(items.into()));
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if !items.len().is_multiple_of(2) {
            return Err("odd number of items for a dict".into());
        }
        let Value::Dict(d) = self.top()? else {
            return Err(format!("setting items on a {}", self.top()?.kind()));
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.insert(k, v)?;
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            v => Err(format!("appending to a {}", v.kind())),
        }
    }

    /// One opcode; `Some` at STOP.
    fn step(&mut self, op: u8) -> Result<Option<Value>, String> {
        match op {
            // Framing and protocol
            0x80 => {
                let proto = self.r.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is not supported"));
                }
            }
            0x95 => {
                self.r.u64()?; // FRAME: a length hint only
            }
            b'.' => {
                let v = self.pop()?;
                return Ok(Some(v));
            }

            // Stack manipulation
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                // Like Python: POP right after MARK discards the mark.
                if self.marks.last() == Some(&self.stack.len()) {
                    self.marks.pop();
                } else {
                    self.pop()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v);
            }

            // Constants and numbers
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.r.array()?);
                self.stack.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.r.u8()?;
                self.stack.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = self.r.u16()?;
                self.stack.push(Value::Int(v.into()));
            }
            0x8a => {
                let n = self.r.u8()?;
                let v = long(self.r.take(n.into())?);
                self.stack.push(v);
            }
            0x8b => {
                let n = i32::from_le_bytes(self.r.array()?);
                let n = usize::try_from(n).map_err(|_| "negative LONG4 length".to_string())?;
                let v = long(self.r.take(n)?);
                self.stack.push(v);
            }
            b'G' => {
                let v = f64::from_be_bytes(self.r.array()?);
                self.stack.push(Value::Float(v));
            }
            b'I' => {
                let v = match self.line()? {
                    "00" => Value::Bool(false),
                    "01" => Value::Bool(true),
                    s => Value::Int(s.parse().map_err(|_| format!("bad INT {s:?}"))?),
                };
                self.stack.push(v);
            }
            b'L' => {
                let s = self.line()?;
                let v = s
                    .strip_suffix('L')
                    .unwrap_or(s)
                    .parse()
                    .map_err(|_| format!("unsupported LONG {s:?}"))?;
                self.stack.push(Value::Int(v));
            }
            b'F' => {
                let s = self.line()?;
                let v = s.parse().map_err(|_| format!("bad FLOAT {s:?}"))?;
                self.stack.push(Value::Float(v));
            }

            // Strings and bytes
            b'X' => {
                let n = self.r.u32()?;
                let v = self.string(n.into())?;
                self.stack.push(v);
            }
            0x8c => {
                let n = self.r.u8()?;
                let v = self.string(n.into())?;
                self.stack.push(v);
            }
            0x8d => {
                let n = self.r.u64()?;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            b'T' => {
                let n = i32::from_le_bytes(self.r.array()?);
                let n = u64::try_from(n).map_err(|_| "negative BINSTRING length".to_string())?;
                let v = self.py2_string(n)?;
                self.stack.push(v);
            }
            b'U' => {
                let n = self.r.u8()?;
                let v = self.py2_string(n.into())?;
                self.stack.push(v);
            }
            b'B' => {
                let n = self.r.u32()?;
                let v = self.bytes(n.into())?;
                self.stack.push(v);
            }
            b'C' => {
                let n = self.r.u8()?;
                let v = self.bytes(n.into())?;
                self.stack.push(v);
            }
            0x8e | 0x96 => {
                let n = self.r.u64()?;
                let v = self.bytes(n)?;
                self.stack.push(v);
            }

            // Containers
            b')' => self.stack.push(Value::Tuple(Rc::new([]))),
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(items.into()));
            }
            0x85 => self.push_tuple(1)?,
            0x86 => self.push_tuple(2)?,
            0x87 => self.push_tuple(3)?,
            // Sets only ever appear outside the state dict; keeping them as lists is enough.
            b']' | 0x8f => self.stack.push(Value::List(Rc::default())),
            b'l' | 0x91 => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b'}' => self.stack.push(Value::Dict(Rc::default())),
            b'd' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Dict(Rc::default()));
                self.set_items(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }

            // Memo
            b'p' => {
                let i = self
                    .line()?
                    .parse()
                    .map_err(|_| "bad PUT index".to_string())?;
                self.memo_put(i)?;
            }
            b'q' => {
                let i = self.r.u8()?;
                self.memo_put(i.into())?;
            }
            b'r' => {
                let i = self.r.u32()?;
                self.memo_put(i.into())?;
            }
            0x94 => self.memo_put(self.memo.len() as u64)?,
            b'g' => {
                let i = self
                    .line()?
                    .parse()
                    .map_err(|_| "bad GET index".to_string())?;
                let v = self.memo_get(i)?;
                self.stack.push(v);
            }
            b'h' => {
                let i = self.r.u8()?;
                let v = self.memo_get(i.into())?;
                self.stack.push(v);
            }
            b'j' => {
                let i = self.r.u32()?;
                let v = self.memo_get(i.into())?;
                self.stack.push(v);
            }

            // Globals, calls and persistent ids: the restricted part.
            b'c' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                let g = global(&module, &name)?;
                self.stack.push(g);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Some(module), Some(name)) = (module.as_str(), name.as_str()) else {
                    return Err("STACK_GLOBAL needs two strings".into());
                };
                let g = global(module, name)?;
                self.stack.push(g);
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = (self.persistent_load)(pid)?;
                self.stack.push(v);
            }
            b'P' => {
                let pid = Value::Str(self.line()?.into());
                let v = (self.persistent_load)(pid)?;
                self.stack.push(v);
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let v = reduce(&f, &args)?;
                self.stack.push(v);
            }
            0x81 => {
                let args = self.pop()?;
                let cls = self.pop()?;
                match (&cls, args.items().as_deref()) {
                    (Value::Global(Global::OrderedDict), Some([])) => {
                        self.stack.push(Value::Dict(Rc::default()))
                    }
                    _ => return Err(format!("NEWOBJ of a {} is not supported", cls.kind())),
                }
            }
            b'b' => {
                let state = self.pop()?;
                build(self.top()?, &state)?;
            }
            b'i' | b'o' | 0x92 => return Err("creating arbitrary objects is not supported".into()),
            0x82..=0x84 => return Err("the pickle extension registry is not supported".into()),
            0x97 | 0x98 => return Err("out-of-band buffers are not supported".into()),
            b'S' | b'V' => return Err("protocol 0 strings are not supported".into()),
            _ => return Err("unknown opcode".into()),
        }
        Ok(None)
    }
}

fn global(module: &str, name: &str) -> Result<Value, String> {
    Global::resolve(module, name).map(Value::Global).ok_or_else(|| {
        format!(
            "global {module}.{name} is not allowed (a state dict needs only collections.OrderedDict, \
             torch._utils tensor/parameter rebuilds and torch.*Storage types)"
        )
    })
}

/// A LONG1/LONG4 payload: little-endian two's complement.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() <= 8 {
        let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut w = [fill; 8];
        w[..bytes.len()].copy_from_slice(bytes);
        Value::Int(i64::from_le_bytes(w))
    } else {
        Value::BigInt(bytes.into())
    }
}

/// Calls a whitelisted global.
fn reduce(f: &Value, args: &Value) -> Result<Value, String> {
    let Value::Global(g) = f else {
        return Err(format!("calling a {} is not supported", f.kind()));
    };
    let args = args
        .items()
        .ok_or_else(|| format!("call arguments are a {}, not a tuple", args.kind()))?;
    match (g, args.as_slice()) {
        (Global::OrderedDict, []) => Ok(Value::Dict(Rc::default())),
        (Global::OrderedDict, [pairs]) => {
            let pairs = pairs.items().ok_or("OrderedDict() takes a list of pairs")?;
            let mut d = Dict::default();
            for p in pairs {
                match p.items().as_deref() {
                    Some([k, v]) => d.insert(k.clone(), v.clone())?,
                    _ => return Err("OrderedDict() takes a list of pairs".into()),
                }
            }
            Ok(Value::Dict(Rc::new(RefCell::new(d))))
        }
        // _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]);
        // grad flags, hooks and metadata do not change the values.
        (
            Global::RebuildTensorV2,
            [storage, offset, size, stride, _, _] | [storage, offset, size, stride, _, _, _],
        )
        | (Global::RebuildTensor, [storage, offset, size, stride]) => {
            let Value::Storage(storage) = storage else {
                return Err(format!("tensor storage is a {}", storage.kind()));
            };
            let shape = size.usizes("tensor size")?;
            let stride = stride.usizes("tensor stride")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "tensor size {shape:?} and stride {stride:?} differ in rank"
                ));
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: storage.clone(),
                offset: offset.usize("storage offset")?,
                shape,
                stride,
            })))
        }
        // _rebuild_parameter(data, requires_grad, hooks[, state]): the parameter is its data.
        (Global::RebuildParameter, [data @ Value::Tensor(_), _, _])
        | (Global::RebuildParameterWithState, [data @ Value::Tensor(_), _, _, _]) => {
            Ok(data.clone())
        }
        (g, args) => Err(format!("cannot call {g:?} with {} arguments", args.len())),
    }
}

/// BUILD (`obj.__setstate__(state)`). On a dict the state holds attributes, such as the
/// `_metadata` (module versions) torch attaches to a state dict; they are not entries, so they
/// are dropped.
fn build(obj: &Value, state: &Value) -> Result<(), String> {
    match (obj, state) {
        (Value::Dict(_), Value::Dict(_) | Value::None) => Ok(()),
        (Value::Dict(_), Value::Tuple(t)) if t.len() == 2 => Ok(()),
        _ => Err(format!(
            "setting the state of a {} from a {} is not supported",
            obj.kind(),
            state.kind()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_persistent(_: Value) -> Result<Value, String> {
        Err("no persistent ids here".into())
    }

    fn run(bytes: &[u8]) -> Result<Value, String> {
        let mut pos = 0;
        load(bytes, &mut pos, &mut no_persistent)
    }

    #[test]
    fn forbidden_global_is_rejected() {
        // pickle.dumps of os.system("echo pwned") by reduction, protocol 2.
        let evil = b"\x80\x02cos\nsystem\nq\x00X\x0a\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.";
        let err = run(evil).unwrap_err();
        assert!(err.contains("global os.system is not allowed"), "{err}");
        assert!(err.starts_with("pickle byte 2 "), "{err}");
        // The same through STACK_GLOBAL (protocol 4).
        let evil4 = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94.";
        assert!(run(evil4)
            .unwrap_err()
            .contains("global builtins.eval is not allowed"));
        // Object-creating opcodes are refused even without a global.
        assert!(run(b"(i__main__\nX\n.")
            .unwrap_err()
            .contains("creating arbitrary objects"));
    }

    #[test]
    fn basic_values_memo_and_shared_dicts() {
        // {'a': [1, -2, 3.5, True, None, 'é', b'x', 2**70], 'b': (...)} with the dict memoized
        // before its items are set, and fetched back afterwards.
        let mut p = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00\x88NX\x02\x00\x00\x00\xc3\xa9C\x01x\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x40eX\x01\x00\x00\x00b".to_vec();
        p.extend_from_slice(b"M\x00\x01\x8a\x01\xff\x86u0h\x00.");
        let Value::Dict(d) = run(&p).unwrap() else {
            panic!("not a dict")
        };
        let d = d.borrow();
        let Some(Value::List(l)) = d.get("a") else {
            panic!("no list")
        };
        let l = l.borrow();
        assert!(
            matches!(l[..], [Value::Int(1), Value::Int(-2), Value::Float(f), Value::Bool(true), Value::None, ..] if f == 3.5)
        );
        assert_eq!(l[5].as_str(), Some("é"));
        assert!(matches!(&l[6], Value::Bytes(b) if &b[..] == b"x"));
        assert!(matches!(&l[7], Value::BigInt(b) if b.len() == 9));
        let Some(Value::Tuple(t)) = d.get("b") else {
            panic!("no tuple")
        };
        assert!(matches!(t[..], [Value::Int(256), Value::Int(-1)]));
    }

    #[test]
    fn truncated_and_malformed_pickles_are_errors() {
        assert!(run(b"\x80\x02X\x05\x00\x00\x00ab")
            .unwrap_err()
            .contains("unexpected end of data"));
        assert!(run(b"\x80\x02")
            .unwrap_err()
            .contains("unexpected end of data"));
        assert!(run(b"\x80\x02h\x07.")
            .unwrap_err()
            .contains("memo slot 7 is empty"));
        assert!(run(b"\x80\x02t.").unwrap_err().contains("no MARK"));
        assert!(run(b"\x80\x02(0.").unwrap_err().contains("stack underflow"));
        assert!(run(b"\x80\x02K\x00K\x01K\x02s.")
            .unwrap_err()
            .contains("setting items on a int"));
        assert!(run(b"\xff").unwrap_err().contains("unknown opcode"));
    }
}
