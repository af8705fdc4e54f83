"""Model surgery: new models made from the weights of trained ones.

- :mod:`condcomp.surgery.upcycle` (``condcomp upcycle``): a dense model's weights as the start
  of a conditional one;
- :mod:`condcomp.surgery.distill` (``condcomp distill``, ``[distill]``): a teacher's
  probabilities in a student's loss.
"""
