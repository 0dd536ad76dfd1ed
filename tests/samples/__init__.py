"""Sample-input generators, one module per op family (pytorch/extension-cpp's ``sample_inputs``):
each yields fresh random inputs that feed the family's correctness tests, opcheck and the
kernel-parametrised tests alike. The tests import them as ``from samples.<family> import ...``
(pytest puts tests/ on sys.path)."""
from dataclasses import dataclass, field


@dataclass
class Sample:
    """One call of an op: ``op(*args, **kwargs)``; ``name`` says what the sample covers."""
    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __str__(self):
        return self.name
