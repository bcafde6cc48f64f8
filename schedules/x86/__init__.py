"""Default schedules for x86 CPUs, in the order the dispatcher tries them."""

from .conv2d import X86Conv2dBlocked, X86Conv2dSpatial
from .linear import X86Linear, X86LinearDot
from .max_pool2d import X86MaxPool2d
from .relu import X86Relu

RULES = [X86Conv2dBlocked(), X86Conv2dSpatial(), X86LinearDot(), X86Linear(), X86MaxPool2d(), X86Relu()]
