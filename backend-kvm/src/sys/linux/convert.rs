//! Conversions between the neutral register types of `vmm::hypervisor` and kvm-bindings' structs.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use vmm::hypervisor::{X86DescriptorTable, X86Regs, X86Segment, X86Sregs};

pub fn regs_from_kvm(r: &kvm_regs) -> X86Regs {
    X86Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn regs_to_kvm(r: &X86Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn segment_from_kvm(s: &kvm_segment) -> X86Segment {
    X86Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

pub fn segment_to_kvm(s: &X86Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn dtable_from_kvm(d: &kvm_dtable) -> X86DescriptorTable {
    X86DescriptorTable { base: d.base, limit: d.limit }
}

fn dtable_to_kvm(d: &X86DescriptorTable) -> kvm_dtable {
    kvm_dtable { base: d.base, limit: d.limit, padding: [0; 3] }
}

pub fn sregs_from_kvm(s: &kvm_sregs) -> X86Sregs {
    X86Sregs {
        cs: segment_from_kvm(&s.cs),
        ds: segment_from_kvm(&s.ds),
        es: segment_from_kvm(&s.es),
        fs: segment_from_kvm(&s.fs),
        gs: segment_from_kvm(&s.gs),
        ss: segment_from_kvm(&s.ss),
        tr: segment_from_kvm(&s.tr),
        ldt: segment_from_kvm(&s.ldt),
        gdt: dtable_from_kvm(&s.gdt),
        idt: dtable_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// The interrupt bitmap is left empty: with the in-kernel irqchip KVM keeps pending external
/// interrupts in the LAPIC (saved with the vCPU events and LAPIC blobs), not here.
pub fn sregs_to_kvm(s: &X86Sregs) -> kvm_sregs {
    kvm_sregs {
        cs: segment_to_kvm(&s.cs),
        ds: segment_to_kvm(&s.ds),
        es: segment_to_kvm(&s.es),
        fs: segment_to_kvm(&s.fs),
        gs: segment_to_kvm(&s.gs),
        ss: segment_to_kvm(&s.ss),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldt),
        gdt: dtable_to_kvm(&s.gdt),
        idt: dtable_to_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(seed: u64) -> kvm_segment {
        kvm_segment {
            base: 0x1000 * seed + 7,
            limit: 0xffff_0000 | seed as u32,
            selector: (seed as u16) << 3,
            type_: (seed % 16) as u8,
            present: 1,
            dpl: (seed % 4) as u8,
            db: (seed % 2) as u8,
            s: 1,
            l: ((seed + 1) % 2) as u8,
            g: 1,
            avl: (seed % 2) as u8,
            unusable: 0,
            padding: 0,
        }
    }

    #[test]
    fn regs_survive_a_round_trip_through_the_neutral_type() {
        let mut kvm = kvm_regs::default();
        // Distinct values per field so a swapped field shows up.
        for (i, field) in [
            &mut kvm.rax,
            &mut kvm.rbx,
            &mut kvm.rcx,
            &mut kvm.rdx,
            &mut kvm.rsi,
            &mut kvm.rdi,
            &mut kvm.rsp,
            &mut kvm.rbp,
            &mut kvm.r8,
            &mut kvm.r9,
            &mut kvm.r10,
            &mut kvm.r11,
            &mut kvm.r12,
            &mut kvm.r13,
            &mut kvm.r14,
            &mut kvm.r15,
            &mut kvm.rip,
            &mut kvm.rflags,
        ]
        .into_iter()
        .enumerate()
        {
            *field = 0x0101_0000_0000_0000 * (i as u64 + 1) + i as u64;
        }
        let neutral = regs_from_kvm(&kvm);
        assert_eq!(neutral.rbx, kvm.rbx);
        assert_eq!(neutral.r15, kvm.r15);
        assert_eq!(neutral.rflags, kvm.rflags);
        assert_eq!(regs_to_kvm(&neutral), kvm);
        assert_eq!(regs_from_kvm(&regs_to_kvm(&neutral)), neutral);
    }

    #[test]
    fn sregs_survive_a_round_trip_through_the_neutral_type() {
        let kvm = kvm_sregs {
            cs: segment(1),
            ds: segment(2),
            es: segment(3),
            fs: segment(4),
            gs: segment(5),
            ss: segment(6),
            tr: segment(7),
            ldt: kvm_segment { unusable: 1, present: 0, ..segment(8) },
            gdt: kvm_dtable { base: 0x500, limit: 0x1f, padding: [0; 3] },
            idt: kvm_dtable { base: 0x520, limit: 0x7ff, padding: [0; 3] },
            cr0: 0x8000_0011,
            cr2: 0xdead,
            cr3: 0x9000,
            cr4: 0x20,
            cr8: 3,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            interrupt_bitmap: [0; 4],
        };
        let neutral = sregs_from_kvm(&kvm);
        assert_eq!(neutral.cs.base, kvm.cs.base);
        assert!(neutral.ldt.unusable && !neutral.ldt.present);
        assert_eq!(neutral.tr.selector, 7 << 3);
        assert_eq!(neutral.idt.limit, 0x7ff);
        assert_eq!(sregs_to_kvm(&neutral), kvm);
    }

    #[test]
    fn segment_flags_map_to_booleans() {
        let kvm = kvm_segment { present: 1, db: 0, s: 1, l: 0, g: 1, avl: 0, ..segment(3) };
        let neutral = segment_from_kvm(&kvm);
        assert!(neutral.present && neutral.s && neutral.g);
        assert!(!neutral.db && !neutral.l && !neutral.avl);
        assert_eq!(segment_to_kvm(&neutral), kvm);
    }
}
