fn main() {
    eprintln!("lockstep: being written");
}
