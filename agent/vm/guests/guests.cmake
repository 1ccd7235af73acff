# SPDX-License-Identifier: Apache-2.0
# Built-in guests: freestanding flat images (dirtier, memcheck, touch) compiled with
# ${CMAKE_C_COMPILER} through add_custom_command rather than as CMake targets, so the host
# build's CMAKE_C_FLAGS, build type and sanitizers never reach code that runs without a
# runtime. Each guest is linked at FERRY_IMAGE_GPA by guest.ld (which also writes the
# struct ferry_image_hdr), turned into a raw image with objcopy, and embedded into libvm by
# a generated assembly file that .incbin's every image between start/end symbols. A
# generated header carries the image sizes as constants so guests.c can keep a const table.
#
# Included from agent/CMakeLists.txt (same scope); sets FERRY_GUEST_BLOB to the generated
# sources to add to the `vm` library.

set(FERRY_GUESTS dirtier memcheck touch)

set(_fg_src ${CMAKE_CURRENT_LIST_DIR})
set(_fg_out ${CMAKE_CURRENT_BINARY_DIR}/guests)
file(MAKE_DIRECTORY ${_fg_out})

if(NOT CMAKE_OBJCOPY)
  find_program(CMAKE_OBJCOPY objcopy REQUIRED)
endif()

set(_fg_cflags
  -std=gnu11 -O2 -m64 -static -nostdlib -ffreestanding -fno-pic -fno-pie
  -fno-stack-protector -mno-red-zone -mgeneral-regs-only -fno-asynchronous-unwind-tables
  -fno-unwind-tables -fcf-protection=none -fno-common
  -Wall -Wextra -Wshadow -Wformat=2 -Wmissing-prototypes -Wstrict-prototypes -Werror
  -I${PROJECT_SOURCE_DIR}/agent/vm -I${_fg_src})
set(_fg_ldflags
  -m64 -static -nostdlib -no-pie -Wl,-T,${_fg_src}/guest.ld -Wl,--build-id=none
  -Wl,-z,noexecstack)
set(_fg_headers ${_fg_src}/guestlib.h ${PROJECT_SOURCE_DIR}/agent/vm/guest_abi.h)

# Objects shared by every guest: the entry stub (first in the link) and the runtime.
set(_fg_common)
foreach(_src entry.S guestlib.c)
  get_filename_component(_name ${_src} NAME_WE)
  add_custom_command(
    OUTPUT ${_fg_out}/${_name}.o
    COMMAND ${CMAKE_C_COMPILER} ${_fg_cflags} -c ${_fg_src}/${_src} -o ${_fg_out}/${_name}.o
    DEPENDS ${_fg_src}/${_src} ${_fg_headers} ${_fg_src}/guests.cmake
    COMMENT "Building guest object ${_name}.o"
    VERBATIM)
  list(APPEND _fg_common ${_fg_out}/${_name}.o)
endforeach()

set(_fg_images)
foreach(_g ${FERRY_GUESTS})
  add_custom_command(
    OUTPUT ${_fg_out}/${_g}.o
    COMMAND ${CMAKE_C_COMPILER} ${_fg_cflags} -c ${_fg_src}/${_g}.c -o ${_fg_out}/${_g}.o
    DEPENDS ${_fg_src}/${_g}.c ${_fg_headers} ${_fg_src}/guests.cmake
    COMMENT "Building guest object ${_g}.o"
    VERBATIM)
  add_custom_command(
    OUTPUT ${_fg_out}/${_g}.img
    COMMAND ${CMAKE_C_COMPILER} ${_fg_ldflags} -o ${_fg_out}/${_g}.elf ${_fg_common}
            ${_fg_out}/${_g}.o
    COMMAND ${CMAKE_OBJCOPY} -O binary ${_fg_out}/${_g}.elf ${_fg_out}/${_g}.img
    DEPENDS ${_fg_common} ${_fg_out}/${_g}.o ${_fg_src}/guest.ld
    BYPRODUCTS ${_fg_out}/${_g}.elf
    COMMENT "Linking guest image ${_g}.img"
    VERBATIM)
  list(APPEND _fg_images ${_fg_out}/${_g}.img)
endforeach()

# The blob and the size header are rewritten whenever an image changes, so the assembler
# re-runs (it cannot see .incbin inputs on its own). gen_blob.cmake also checks each
# image's header against the file, failing the build rather than shipping a bad image.
string(REPLACE ";" "," _fg_list "${FERRY_GUESTS}")
add_custom_command(
  OUTPUT ${_fg_out}/guest_blob.S ${_fg_out}/guest_images.h
  COMMAND ${CMAKE_COMMAND} -DFERRY_GUESTS=${_fg_list} -DOUT_DIR=${_fg_out}
          -P ${_fg_src}/gen_blob.cmake
  DEPENDS ${_fg_images} ${_fg_src}/gen_blob.cmake
  COMMENT "Embedding built-in guest images"
  VERBATIM)

set(FERRY_GUEST_BLOB ${_fg_out}/guest_blob.S ${_fg_out}/guest_images.h)
set_source_files_properties(${_fg_out}/guest_blob.S PROPERTIES OBJECT_DEPENDS "${_fg_images}")
set_source_files_properties(${PROJECT_SOURCE_DIR}/agent/vm/guests.c PROPERTIES
  INCLUDE_DIRECTORIES ${_fg_out}
  OBJECT_DEPENDS ${_fg_out}/guest_images.h)
